"""Feature shards on disk: safetensors files plus a ``manifest.json`` that says what they hold.

A feature store is a directory::

    out_dir/
        manifest.json              # FlowConfig, model fingerprint, protocol, dataset, shard hashes, counts
        shard-00000.safetensors    # values / valid / positions / labels / index / ... + per-sample metadata
        shard-00001.safetensors
        ...

Every file is written to a hidden temporary file in the same directory and moved into place with
:func:`os.replace`, so a process killed at any moment leaves either the old file or the complete
new one -- never a partial shard under a ``shard-*.safetensors`` name. No pickles: tensors are
safetensors, per-sample strings (uids, sources, generated answers) are JSON in the safetensors
metadata.

Example:
    >>> store = FeatureStore.open("features/halueval-qa-paired")  # doctest: +SKIP
    >>> feats, labels, uids = store.load()  # doctest: +SKIP
    >>> feats.values.shape  # [N, B, T, F]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.errors import CorruptShardError, FeatureStoreError
from hf_flowcheck.features import FlowFeatures, pad_features
from hf_flowcheck.version import __version__

__all__ = [
    "MANIFEST_NAME",
    "STORE_FORMAT",
    "STORE_FORMAT_VERSION",
    "CorruptShardError",
    "FeatureStore",
    "FeatureStoreError",
    "ShardData",
    "atomic_write_bytes",
    "file_sha256",
    "pad_features",
    "read_manifest",
    "read_shard",
    "read_shard_metadata",
    "remove_stale_temp_files",
    "shard_name",
    "verify_shard",
    "write_manifest",
    "write_shard",
]

MANIFEST_NAME = "manifest.json"
STORE_FORMAT = "hf_flowcheck.feature_store"
STORE_FORMAT_VERSION = 1
_TMP_PREFIX = ".tmp-"
_META_KEY = "hf_flowcheck"

#: Tensor names of one shard (first dimension ``n``, the samples stored in the shard).
SHARD_TENSORS = ("values", "valid", "positions", "labels", "index", "sample_keys", "prompt_lengths")


def shard_name(index: int) -> str:
    """File name of shard ``index``: ``shard-00000.safetensors``."""
    return f"shard-{index:05d}.safetensors"


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _temp_path(final: Path):
    """A hidden temporary path next to ``final``; removed on any exception."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; a store is as readable as any file the user writes
    try:
        yield Path(tmp)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_and_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    if hasattr(os, "O_DIRECTORY"):  # persist the rename itself (POSIX)
        with contextlib.suppress(OSError):
            dfd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and :func:`os.replace`."""
    final = Path(path)
    with _temp_path(final) as tmp:
        tmp.write_bytes(data)
        _fsync_and_replace(tmp, final)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[str]:
    """Delete temporary files a killed writer left behind; returns their names."""
    removed = []
    d = Path(directory)
    if d.is_dir():
        for p in d.iterdir():
            if p.name.startswith(_TMP_PREFIX) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p.name)
    return removed


# ------------------------------------------------------------------------------------ shards
@dataclass
class ShardData:
    """The content of one shard.

    Attributes:
        values: ``[n, B, T, F]`` float32 features (zeros where not valid).
        valid: ``[n, B, T]`` bool.
        positions: ``[n, T]`` long: index of each column in the sample's *unpadded* token
            sequence (prompt + answer), -1 for padding.
        labels: ``[n]`` long, 0 correct / 1 hallucinated.
        index: ``[n]`` long, position of each sample in the extraction's input list.
        sample_keys: ``[n]`` long, the per-sample keys of the direction-cap sampler.
        prompt_lengths: ``[n]`` long, prompt tokens of each sample.
        uids: ``n`` source-record uids.
        states: ``[n, B+1, d]`` residual-state summaries (``FlowConfig.state_summary``) or ``None``.
        metadata: Per-sample string lists (``sources``, ``answers``, ...) and shard-level JSON
            values (``counts``, ``plan_key``, ``shard``); stored with ``uids`` as one JSON string under
            the ``"hf_flowcheck"`` key of the safetensors metadata.
    """

    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    sample_keys: torch.Tensor
    prompt_lengths: torch.Tensor
    uids: list[str]
    metadata: dict[str, Any]
    states: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def write_shard(path: str | os.PathLike[str], shard: ShardData) -> str:
    """Atomically write one shard; returns its sha256.

    Raises:
        ValueError: The tensors disagree on the number of samples.
    """
    from safetensors.torch import save_file

    n = len(shard.uids)
    tensors = {name: getattr(shard, name).detach().to("cpu").contiguous() for name in SHARD_TENSORS}
    if shard.states is not None:
        tensors["states"] = shard.states.detach().to("cpu", torch.float32).contiguous()
    for name, t in tensors.items():
        if t.shape[0] != n:
            raise ValueError(f"shard tensor {name!r} has {t.shape[0]} rows but there are {n} uids.")
    # One metadata key: safetensors writes its metadata map in random order, so one key keeps a
    # shard's bytes (and sha256) reproducible.
    content = {"format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, **shard.metadata, "uids": shard.uids}
    meta = {_META_KEY: json.dumps(content, sort_keys=True)}
    final = Path(path)
    with _temp_path(final) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        digest = file_sha256(tmp)
        _fsync_and_replace(tmp, final)
    return digest


def read_shard_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded metadata of a shard without loading its tensors (``uids`` included)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if _META_KEY not in raw:
        raise FeatureStoreError(f"{path} is not an hf_flowcheck feature shard (no {_META_KEY!r} metadata).")
    return json.loads(raw[_META_KEY])


def read_shard(path: str | os.PathLike[str]) -> ShardData:
    """Load one shard (no hash check; :class:`FeatureStore` does that)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    meta = read_shard_metadata(path)
    missing = [t for t in SHARD_TENSORS if t not in tensors]
    if missing or meta.get("format") != STORE_FORMAT:
        raise FeatureStoreError(f"{path} is not an hf_flowcheck feature shard (missing {missing or 'format tag'}).")
    uids = meta.pop("uids")
    for key in ("format", "format_version"):
        meta.pop(key, None)
    return ShardData(**{t: tensors[t] for t in SHARD_TENSORS}, uids=uids, metadata=meta, states=tensors.get("states"))


# ---------------------------------------------------------------------------------- manifest
def write_manifest(directory: str | os.PathLike[str], manifest: Mapping[str, Any]) -> None:
    """Atomically write ``manifest.json``."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    atomic_write_bytes(Path(directory) / MANIFEST_NAME, data)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The manifest of ``directory``, or ``None`` when there is none.

    Raises:
        FeatureStoreError: The manifest is not valid JSON or is from a newer format.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise FeatureStoreError(
            f"{path} is not valid JSON ({err}); delete the directory and rerun the extraction."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise FeatureStoreError(f"{path} is not an hf_flowcheck feature-store manifest.")
    version = manifest.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise FeatureStoreError(f"{path}: format_version {version!r} is not an integer; {_EDITED}")
    if version > STORE_FORMAT_VERSION:
        raise FeatureStoreError(
            f"{path} has format_version {manifest['format_version']}, newer than this hf_flowcheck "
            f"({__version__}) reads ({STORE_FORMAT_VERSION}); upgrade hf_flowcheck."
        )
    _check_fields(path, manifest)
    return manifest


_EDITED = "the manifest was edited or damaged; rerun the extraction into a new directory."
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_fields(path: Path, manifest: dict[str, Any]) -> None:
    """Every field the store reads has its type, so a damaged manifest is named here, not met later as a
    ``TypeError`` in the middle of a load."""

    def bad(field: str, value: Any, want: str) -> FeatureStoreError:
        return FeatureStoreError(f"{path}: {field} is {value!r}, not {want}; {_EDITED}")

    def is_int(x: Any, low: int = 0) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    shards = manifest.get("shards", [])
    if not isinstance(shards, list):
        raise bad("shards", shards, "a list of shard entries")
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise bad(f"shards[{i}]", entry, "a shard entry (a JSON object)")
        if not is_int(entry.get("num_samples")):
            raise bad(f"shards[{i}].num_samples", entry.get("num_samples"), "a non-negative integer")
        if not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"]):
            raise bad(f"shards[{i}].sha256", entry.get("sha256"), "a sha256 hex digest")
    names = manifest.get("feature_names")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad("feature_names", names, "a list of channel names")
    for field, want in (("protocol", str), ("status", str)):
        if not isinstance(manifest.get(field), want):
            raise bad(field, manifest.get(field), "a string")
    for field in ("counts", "model_fingerprint", "dataset"):
        if manifest.get(field) is not None and not isinstance(manifest[field], dict):
            raise bad(field, manifest[field], "a JSON object")
    if "num_blocks" in manifest and not is_int(manifest["num_blocks"]):
        raise bad("num_blocks", manifest["num_blocks"], "a non-negative integer")
    try:
        cfg = FlowConfig.from_dict(manifest.get("flow_config"))
    except (TypeError, ValueError) as err:
        raise FeatureStoreError(f"{path}: flow_config is not a valid FlowConfig ({err}); {_EDITED}") from None
    if tuple(names) != cfg.feature_names:
        raise FeatureStoreError(
            f"{path}: feature_names {names} are not the channels of its flow_config "
            f"{list(cfg.feature_names)}; {_EDITED}"
        )
    if manifest.get("status") == "complete" and not shards and any(path.parent.glob("shard-*.safetensors")):
        raise FeatureStoreError(f"{path} lists no shards but the folder holds shard files; {_EDITED}")


def _corrupt_message(path: Path, why: str) -> str:
    return (
        f"Feature shard {path} is corrupted ({why}). Delete it (rm '{path}') and rerun the same extraction "
        "command (or extract_dataset call) with the same out_dir: it resumes and regenerates only the missing shard."
    )


def verify_shard(path: Path, expected_sha256: str) -> None:
    """Raise :class:`CorruptShardError` when ``path`` is missing or its sha256 differs."""
    if not path.is_file():
        raise CorruptShardError(
            f"Feature shard {path} listed in the manifest is missing. Rerun the same extraction command with "
            "the same out_dir to regenerate it."
        )
    actual = file_sha256(path)
    if actual != expected_sha256:
        raise CorruptShardError(_corrupt_message(path, f"sha256 {actual[:12]}… != manifest {expected_sha256[:12]}…"))


# ------------------------------------------------------------------------------------ store
def _check_entries(path: Path, manifest: Mapping[str, Any]) -> None:
    """Every manifest entry names its own shard file inside the store, once (a hand-edited or merged
    manifest must not read files elsewhere, or count one shard twice)."""
    entries = manifest.get("shards", [])
    seen: dict[str, set[Any]] = {"index": set(), "file": set(), "sha256": set()}
    for entry in entries:
        index, file = entry.get("index"), entry.get("file")
        if not isinstance(index, int) or file != shard_name(index):
            want = shard_name(index) if isinstance(index, int) else "shard-NNNNN.safetensors"
            raise FeatureStoreError(
                f"The manifest of {path} lists shard {file!r} at index {index!r}; a shard entry must name its own "
                f"file inside the store ({want!r}). The manifest was edited or merged by hand; rerun the extraction "
                "into a new directory."
            )
        for key in seen:
            if entry.get(key) in seen[key]:
                raise FeatureStoreError(
                    f"The manifest of {path} lists the same shard twice ({key} {entry.get(key)!r}); its samples would "
                    "count twice. The manifest was edited or merged by hand; rerun the extraction into a new directory."
                )
            seen[key].add(entry.get(key))


class FeatureStore:
    """Read access to an extracted feature directory (see :func:`hf_flowcheck.workflows.extract.extract_dataset`).

    Use :meth:`open`; the constructor does no checking.

    Attributes:
        path: The directory.
        manifest: The parsed ``manifest.json``.
    """

    def __init__(self, path: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, verify: bool = True, allow_incomplete: bool = False) -> FeatureStore:
        """Open a feature directory, checking every shard against the manifest's sha256.

        Args:
            path: The directory holding ``manifest.json``.
            verify: Hash every shard (default). ``False`` skips the check (faster, unsafe).
            allow_incomplete: Open a store whose extraction has not finished (only the shards
                listed so far are read).

        Raises:
            FileNotFoundError: No manifest in ``path``.
            FeatureStoreError: The extraction has not finished.
            CorruptShardError: A shard is missing or its hash differs; the message names it.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(
                f"No {MANIFEST_NAME} in {path}: not a feature store. Create one with `flowcheck extract --out {path}` "
                "or hf_flowcheck.workflows.extract.extract_dataset(..., out_dir=...)."
            )
        if manifest.get("status") != "complete" and not allow_incomplete:
            raise FeatureStoreError(
                f"The extraction into {path} has not finished (status {manifest.get('status')!r}). Rerun the same "
                "extraction command with the same out_dir to resume it, or pass allow_incomplete=True."
            )
        _check_entries(path, manifest)
        store = cls(path, manifest)
        if verify:
            store.verify()
        return store

    def verify(self) -> None:
        """Check each listed shard's sha256; raises :class:`CorruptShardError` naming the bad one."""
        for entry in self.shards:
            verify_shard(self.path / entry["file"], entry["sha256"])

    # ---------------------------------------------------------------------------- properties
    @property
    def shards(self) -> list[dict[str, Any]]:
        """Manifest entries of the shards, in index order."""
        return sorted(self.manifest.get("shards", []), key=lambda e: e["index"])

    @property
    def config(self) -> FlowConfig:
        """The :class:`FlowConfig` the features were extracted with."""
        return FlowConfig.from_dict(self.manifest["flow_config"])

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["feature_names"])

    @property
    def protocol(self) -> str:
        return str(self.manifest["protocol"])

    @property
    def model_fingerprint(self) -> dict[str, Any]:
        return dict(self.manifest.get("model_fingerprint") or {})

    @property
    def counts(self) -> dict[str, int]:
        """Totals: ``inputs``, ``stored``, ``label_0``, ``label_1``, ``dropped``, ``failed``, ``excluded``."""
        return dict(self.manifest.get("counts", {}))

    def __len__(self) -> int:
        return sum(int(e["num_samples"]) for e in self.shards)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, protocol={self.protocol!r}, samples={len(self)})"

    # ---------------------------------------------------------------------------------- read
    def iter_shards(self) -> Iterable[ShardData]:
        """Yield each shard's :class:`ShardData` in index order."""
        for entry in self.shards:
            yield read_shard(self.path / entry["file"])

    def uids(self) -> list[str]:
        """Uid of every stored sample, in store order (reads only shard headers)."""
        out: list[str] = []
        for entry in self.shards:
            out.extend(read_shard_metadata(self.path / entry["file"])["uids"])
        return out

    def samples(self) -> list[dict[str, Any]]:
        """Per-sample metadata (``uid``, ``label``, ``index``, ``source`` and, when generated, ``answer``)."""
        out = []
        for shard in self.iter_shards():
            extra = {k: v for k, v in shard.metadata.items() if isinstance(v, list) and len(v) == len(shard)}
            for i, uid in enumerate(shard.uids):
                row = {"uid": uid, "label": int(shard.labels[i]), "index": int(shard.index[i])}
                row.update({k[:-1] if k.endswith("s") else k: v[i] for k, v in extra.items()})
                out.append(row)
        return out

    def load(self, split_uids: Iterable[str] | None = None) -> tuple[FlowFeatures, torch.Tensor, list[str]]:
        """Load features, labels and uids, padding ``T`` across shards.

        Args:
            split_uids: Keep only samples whose uid is in this collection (e.g. ``split["test"]``);
                ``None`` keeps all. Both answers of a paired record share its uid.

        Returns:
            ``(features, labels, uids)``: :class:`FlowFeatures` with ``values [N, B, T, F]``,
            ``valid [N, B, T]``, ``positions [N, T]`` (indices into each sample's unpadded
            sequence); ``labels [N]`` long; ``N`` uids. Samples keep store order.
        """
        keep = None if split_uids is None else set(split_uids)
        parts: list[FlowFeatures] = []
        labels: list[torch.Tensor] = []
        uids: list[str] = []
        names = self.feature_names
        for shard in self.iter_shards():
            if keep is None:
                rows = torch.arange(len(shard))
            else:
                rows = torch.tensor([i for i, u in enumerate(shard.uids) if u in keep], dtype=torch.long)
            if rows.numel() == 0:
                continue
            keys = shard.sample_keys[rows].tolist()
            states = None if shard.states is None else shard.states[rows]
            parts.append(
                FlowFeatures(shard.values[rows], shard.valid[rows], shard.positions[rows], names, keys, states=states)
            )
            labels.append(shard.labels[rows])
            uids.extend(shard.uids[i] for i in rows.tolist())
        if not parts:
            n_blocks = int(self.manifest.get("num_blocks", 0))
            empty = FlowFeatures(
                torch.zeros(0, n_blocks, 0, len(names)),
                torch.zeros(0, n_blocks, 0, dtype=torch.bool),
                torch.zeros(0, 0, dtype=torch.long),
                names,
                [],
            )
            return empty, torch.zeros(0, dtype=torch.long), []
        return pad_features(parts), torch.cat(labels), uids
