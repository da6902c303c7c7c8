"""`FlowFeatures`: the flow signatures of a batch, what every later stage reads, with their row
selection and concatenation; `FeatureSource`: where they came from.

Nothing here computes features (:mod:`hf_flowcheck.extraction` does) or stores them
(:mod:`hf_flowcheck.workflows.store`); this module is the one owner of the container both pass around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.signatures import SampleGeometry

__all__ = ["FeatureSource", "FlowFeatures", "pad_features"]


@dataclass(frozen=True)
class FeatureSource:
    """Where features (or a generation) came from: the flow recipe and the model's fingerprint.

    Attributes:
        flow_config: The :class:`~hf_flowcheck.FlowConfig` that computed them.
        fingerprint: :func:`~hf_flowcheck.fingerprint.model_fingerprint` of the model.
    """

    flow_config: FlowConfig
    fingerprint: dict[str, Any]

    def check_model(self, fingerprint: dict[str, Any] | None, what: str) -> None:
        """Raise :class:`~hf_flowcheck.errors.FingerprintMismatchError` if ``fingerprint`` is another model's."""
        from hf_flowcheck.errors import FingerprintMismatchError
        from hf_flowcheck.fingerprint import CHECKED_FIELDS

        if not fingerprint:
            return
        diff = [
            k
            for k in CHECKED_FIELDS
            if fingerprint.get(k) is not None and fingerprint.get(k) != self.fingerprint.get(k)
        ]
        if diff:
            raise FingerprintMismatchError(
                f"{what} came from another model than this one ({', '.join(diff)} differ: "
                f"{self.fingerprint.get('base_id')!r} vs {fingerprint.get('base_id')!r}); use the model that made them."
            )


@dataclass
class FlowFeatures:
    """Flow signatures of a batch.

    Attributes:
        values: ``[N, B, T, F]`` float32 features (zeros where not valid).
        valid: ``[N, B, T]`` bool, true for real events.
        positions: ``[N, T]`` long, the sequence index of each ``T`` column, -1 for padding.
        names: The ``F`` feature names in order.
        sample_keys: The per-sample keys used by the direction-cap sampler.
        geometry: Per-sample window bases and transports (only kept when asked for).
        states: ``[N, B+1, d]`` float32 residual-state summary of each sample's masked tokens
            (``FlowConfig.state_summary``), or ``[N, 1, 3]`` with ``state_summary='token_confidence'``
            (:data:`~hf_flowcheck.readout.TOKEN_CONFIDENCE_NAMES`); zeros for samples without
            tokens; ``None`` when off.
        source: The model and flow config that computed them (set by :class:`FlowExtractor`;
            ``None`` for features read from a store, which checks its own manifest). A validator
            refuses features whose source is not the model and recipe it was trained on.
        word_tokens: ``[N, T]`` bool, true where the column's token has a word character (the
            tokens a culprit may point at); ``None`` when the extractor had no tokenizer, or for
            features read from a store (then any scored token may be the culprit).
    """

    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    names: tuple[str, ...]
    sample_keys: list[int] = field(default_factory=list)
    geometry: list[SampleGeometry | None] | None = None
    states: torch.Tensor | None = None
    source: FeatureSource | None = None
    word_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.values.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.values.shape[1]

    def num_tokens(self) -> torch.Tensor:
        """``[N]`` masked tokens per sample."""
        return (self.positions >= 0).sum(-1)

    def to(self, device: torch.device | str) -> FlowFeatures:
        return FlowFeatures(
            self.values.to(device),
            self.valid.to(device),
            self.positions.to(device),
            self.names,
            list(self.sample_keys),
            self.geometry,
            None if self.states is None else self.states.to(device),
            self.source,
            None if self.word_tokens is None else self.word_tokens.to(device),
        )

    def select(self, names: tuple[str, ...] | list[str]) -> FlowFeatures:
        """The same events with only the feature channels ``names``, in that order.

        Raises:
            ValueError: A name that is not one of :attr:`names`.
        """
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"feature channels {missing} are not among {list(self.names)}.")
        idx = [self.names.index(n) for n in names]
        return FlowFeatures(
            self.values[..., idx], self.valid, self.positions, tuple(names), list(self.sample_keys), self.geometry,
            self.states, self.source, self.word_tokens,
        )  # fmt: skip

    def take(self, idx: Any) -> FlowFeatures:
        """The rows ``idx`` (any integer index sequence, in that order) of every field.

        Args:
            idx: ``[n]`` row indices (list, numpy array or tensor).
        """
        t = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        geo = [self.geometry[i] for i in t.tolist()] if self.geometry is not None else None
        return FlowFeatures(
            self.values[t], self.valid[t], self.positions[t], self.names, [self.sample_keys[i] for i in t.tolist()],
            geo, None if self.states is None else self.states[t], self.source,
            None if self.word_tokens is None else self.word_tokens[t],
        )  # fmt: skip

    def __getitem__(self, idx: int | slice) -> FlowFeatures:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        geo = self.geometry[idx] if self.geometry is not None else None
        states = None if self.states is None else self.states[idx]
        return FlowFeatures(
            self.values[idx],
            self.valid[idx],
            self.positions[idx],
            self.names,
            self.sample_keys[idx],
            geo,
            states,
            self.source,
            None if self.word_tokens is None else self.word_tokens[idx],
        )


def pad_features(parts: Sequence[FlowFeatures]) -> FlowFeatures:
    """Concatenate :class:`FlowFeatures` along ``N``, padding ``T`` to the longest part.

    Args:
        parts: Feature batches with equal ``B``, ``F`` and names.

    Returns:
        ``FlowFeatures`` with ``values [sum N, B, max T, F]`` (padding: zeros / False / -1).
    """
    if not parts:
        raise ValueError("pad_features() needs at least one FlowFeatures.")
    names = parts[0].names
    n_blocks, n_feat = parts[0].values.shape[1], parts[0].values.shape[3]
    t_max = max(p.values.shape[2] for p in parts)
    vals, valid, pos, keys = [], [], [], []
    with_states = [p.states is not None for p in parts]
    if any(with_states) and not all(with_states):
        raise ValueError("pad_features(): some parts carry state summaries and others do not.")
    for p in parts:
        if tuple(p.names) != tuple(names) or p.values.shape[1] != n_blocks or p.values.shape[3] != n_feat:
            raise ValueError("pad_features(): parts have different feature names or block counts.")
        extra = t_max - p.values.shape[2]
        vals.append(torch.nn.functional.pad(p.values, (0, 0, 0, extra)))
        valid.append(torch.nn.functional.pad(p.valid, (0, extra), value=False))
        pos.append(torch.nn.functional.pad(p.positions, (0, extra), value=-1))
        keys.extend(p.sample_keys)
    states = torch.cat([p.states for p in parts]) if all(with_states) else None
    sources = {id(p.source): p.source for p in parts}
    source = next(iter(sources.values())) if len(sources) == 1 else None
    # A part without word flags (no tokenizer, or a store) lifts the culprit rule for the whole batch.
    words = None
    if all(p.word_tokens is not None for p in parts):
        words = torch.cat([torch.nn.functional.pad(p.word_tokens, (0, t_max - p.values.shape[2])) for p in parts])
    return FlowFeatures(
        torch.cat(vals), torch.cat(valid), torch.cat(pos), tuple(names), keys, states=states, source=source,
        word_tokens=words,
    )  # fmt: skip
