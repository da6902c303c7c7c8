"""Re-extract flow features of any variant from a committed answers file, in fixed-size parts.

An answers file grows while the model is still answering; the features of its first ``part_size``
answers never change once they exist. So each complete block of ``part_size`` answers (file order)
is teacher-forced into its own feature store ``part-00000``, ``part-00001``, ... under one root,
and :func:`load_parts` concatenates them. A part is an ordinary resumable
:class:`~hf_flowcheck.workflows.store.FeatureStore` (protocol ``"replayed"``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.workflows.answers import _parse
from hf_flowcheck.workflows.extract import extract_dataset
from hf_flowcheck.workflows.store import FeatureStore, pad_features

__all__ = ["PartedStore", "load_parts", "open_features", "replay_answers"]


def _part_name(i: int) -> str:
    return f"part-{i:05d}"


def replay_answers(
    model: Any,
    tokenizer: Any,
    answers_path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    config: FlowConfig,
    part_size: int = 500,
    batch_size: int = 8,
    include_partial: bool = False,
    progress: bool = False,
    start_part: int = 0,
    skip_started: bool = False,
) -> list[Path]:
    """Extract every complete part of ``answers_path`` not extracted yet; returns the part folders.

    Args:
        model: The model that wrote the answers (its fingerprint must match the file's).
        tokenizer: Its tokenizer.
        answers_path: JSONL from :func:`~hf_flowcheck.workflows.answers.generate_answers` (may be growing).
        out_root: Folder of the part stores.
        config: Flow configuration of this variant.
        part_size: Answers per part (file order; unlabelled answers are counted and skipped).
        batch_size: Sequences per forward.
        include_partial: Also extract the last, incomplete part (for a finished file).
        progress: Show tqdm bars.
        start_part: First part to extract (a second process can start further on).
        skip_started: Leave parts another process has started (a folder without a complete manifest).

    Raises:
        AnswerFileError: A malformed answers file.
        ValueError: The model is not the one that wrote the answers.
    """
    from hf_flowcheck.fingerprint import CHECKED_FIELDS, model_fingerprint

    answers, _ = _parse(Path(answers_path).expanduser(), allow_torn_tail=True)
    fp, stored = model_fingerprint(model), answers.header.get("model") or {}
    diff = [k for k in CHECKED_FIELDS if fp.get(k) != stored.get(k)]
    if diff:
        raise ValueError(
            f"{answers_path} was written by another model ({', '.join(diff)} differ); replay it with the model "
            f"that answered ({stored.get('base_id')!r})."
        )
    root = Path(out_root)
    recs = answers.records
    n_parts = len(recs) // part_size + (1 if include_partial and len(recs) % part_size else 0)
    out = []
    for i in range(start_part, n_parts):
        part = recs[i * part_size : (i + 1) * part_size]
        folder = root / _part_name(i)
        if skip_started and folder.exists() and not _is_complete(folder):
            continue
        extract_dataset(
            model,
            tokenizer,
            part,
            folder,
            config=config,
            protocol="replayed",
            batch_size=batch_size,
            shard_size=part_size,
            progress=progress,
            dataset={"answers": str(answers_path), "part": i, "part_size": part_size, **answers.header["dataset"]},
        )
        out.append(folder)
    return out


def _is_complete(folder: Path) -> bool:
    import json

    try:
        return json.loads((folder / "manifest.json").read_text()).get("status") == "complete"
    except (OSError, ValueError):
        return False


def load_parts(out_root: str | os.PathLike[str]) -> tuple[FlowFeatures, torch.Tensor, list[str]]:
    """Concatenate every complete part store under ``out_root``: ``(features, labels, uids)``."""
    return PartedStore(out_root).load()


class PartedStore:
    """The complete part stores under one root, read as one :class:`~hf_flowcheck.workflows.store.FeatureStore`.

    Offers what training and evaluation read: ``load``, ``samples``, ``config``, ``protocol``,
    ``model_fingerprint``, ``manifest`` and ``counts``. Every part must share the FlowConfig and model.

    Raises:
        FileNotFoundError: No complete part under ``root``.
        ValueError: Parts of different FlowConfigs or models.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root)
        folders = sorted(p for p in self.path.glob("part-*") if (p / "manifest.json").is_file())
        # Parts still being extracted (a growing answers file) are left out, not refused.
        self.parts = [FeatureStore.open(p, allow_incomplete=True) for p in folders]
        self.parts = [s for s in self.parts if s.manifest.get("status") == "complete"]
        if not self.parts:
            raise FileNotFoundError(f"{self.path} holds no complete part store; run replay_answers first.")
        first = self.parts[0].manifest
        for store in self.parts[1:]:
            for key in ("flow_config_key", "model_fingerprint", "protocol"):
                if store.manifest.get(key) != first.get(key):
                    raise ValueError(f"{store.path} has another {key} than {self.parts[0].path}; parts cannot mix.")
        counts: dict[str, int] = {}
        for store in self.parts:
            for k, v in store.counts.items():
                counts[k] = counts.get(k, 0) + int(v)
        self.manifest = {**first, "counts": counts, "parts": [str(s.path) for s in self.parts]}

    config = FeatureStore.config
    feature_names = FeatureStore.feature_names
    protocol = FeatureStore.protocol
    model_fingerprint = FeatureStore.model_fingerprint
    counts = FeatureStore.counts

    def __len__(self) -> int:
        return sum(len(s) for s in self.parts)

    def uids(self) -> list[str]:
        return [u for s in self.parts for u in s.uids()]

    def samples(self) -> list[dict[str, Any]]:
        return [row for s in self.parts for row in s.samples()]

    def load(self, split_uids: Any = None) -> tuple[FlowFeatures, torch.Tensor, list[str]]:
        keep = None if split_uids is None else set(split_uids)
        loaded = [s.load(keep) for s in self.parts]
        loaded = [x for x in loaded if len(x[2])] or loaded[:1]
        return (
            pad_features([x[0] for x in loaded]),
            torch.cat([x[1] for x in loaded]),
            [u for x in loaded for u in x[2]],
        )


def open_features(path: str | os.PathLike[str]) -> FeatureStore | PartedStore:
    """A feature store folder, or a root of replayed part stores."""
    p = Path(path).expanduser()
    if (p / "manifest.json").is_file() or not any(p.glob("part-*")):
        return FeatureStore.open(p)
    return PartedStore(p)
