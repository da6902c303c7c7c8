"""`FlowExtractor`: teacher-forced flow signatures, and their assembly from captured states.

Capture while the model generates lives in :mod:`hf_flowcheck.generation`; it hands its states to
:meth:`FlowExtractor.features_from_states`.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import ArchitectureSpec, ResolvedArchitecture, resolve_architecture, unwrap_model
from hf_flowcheck.capture import CapturedStates, FlowRecorder, rows_of
from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.features import FeatureSource, FlowFeatures
from hf_flowcheck.model_io import eos_token_ids, forward_kwargs, input_device
from hf_flowcheck.readout import lens_features, token_confidence_rows, token_confidence_summary
from hf_flowcheck.signatures import (
    SampleGeometry,
    block_updates,
    boundary_states,
    closed_form_norm_jvp,
    fit_sample_bases,
    sample_flow_features,
    token_key,
    window_layout,
)
from hf_flowcheck.tokens import token_table

__all__ = [
    "STREAM_REFITS",
    "FeatureSource",
    "FlowExtractor",
    "FlowFeatures",
    "StreamCache",
]  # FeatureSource and FlowFeatures live in hf_flowcheck.features; re-exported here for existing imports


def _float_copy(module: nn.Module) -> nn.Module:
    """A float32, hook-free, grad-free copy of a (small) norm module."""
    dup = copy.deepcopy(module)
    if hasattr(dup, "_hf_hook"):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(dup)
    dup._forward_hooks.clear()
    dup._forward_pre_hooks.clear()
    dup = dup.float().eval()
    for p in dup.parameters():
        p.requires_grad_(False)
    return dup


#: When streaming checks refit the window bases: at every check (exact), or once the answer has
#: doubled in length since the last fit (1, 2, 4, 8, ... tokens; checks in between project onto the
#: last bases). The final score always refits.
STREAM_REFITS: tuple[str, ...] = ("always", "doubling")


@dataclass
class StreamCache:
    """What the streaming checks of one ``generate`` call reuse between checks.

    A captured (row, position) is recorded once per call, so everything that depends on one
    token's states only is computed once: its lens channels and its block updates (the JVPs).
    Both are exact. The window bases depend on the whole answer so far; ``refit`` says when a
    check refits them (``"doubling"`` is an approximation of the spec at that check).

    Attributes:
        refit: One of :data:`STREAM_REFITS`.
        lens: ``{(row, position): [B, 4]}``.
        updates: ``{(row, position): [B, 3, d]}``.
        confidence: ``{(row, position): [2]}`` log p and entropy of the token at ``position``.
        bases: ``{row: (tokens fitted on, [J] bases [d, k])}``.
        checked: Captured positions already checked for non-finite values.
    """

    refit: str = "always"
    lens: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    updates: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    confidence: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    bases: dict[int, tuple[int, list[torch.Tensor]]] = field(default_factory=dict)
    checked: int = 0

    def __post_init__(self) -> None:
        if self.refit not in STREAM_REFITS:
            raise ValueError(
                f"flow_check_refit={self.refit!r} is not supported; use one of {', '.join(map(repr, STREAM_REFITS))}."
            )

    def exact(self) -> StreamCache:
        """The same per-token caches, with bases refitted (what the final score uses)."""
        return dataclasses.replace(self, refit="always")


def _cached_rows(
    cache: dict[tuple[int, int], torch.Tensor], keys: list[tuple[int, int]], compute: Any, dim: int
) -> torch.Tensor:
    """Rows of ``compute(indices)`` (stacked along ``dim``) for ``keys``, computing only the missing ones."""
    todo = [j for j, k in enumerate(keys) if k not in cache]
    if todo:
        new = compute(todo)
        for col, j in enumerate(todo):
            cache[keys[j]] = new.select(dim, col)
    return torch.stack([cache[k] for k in keys], dim=dim)


class FlowExtractor:
    """Computes flow signatures of a HuggingFace causal LM (spec ``flow-signatures.md``).

    Args:
        model: A transformers ``*ForCausalLM`` (PEFT-wrapped models are unwrapped for hooks).
        config: Flow configuration; defaults to ``FlowConfig()``.
        tokenizer: Optional; its special tokens are excluded from the token mask.
        architecture: Override the module paths for this model.
        special_token_ids: Extra token ids to exclude from the mask.
        keep_geometry: Keep each sample's window bases in the result.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
        ...     num_attention_heads=4, intermediate_size=37)).eval()
        >>> ext = FlowExtractor(model, FlowConfig(window_length=2, window_stride=1, subspace_dim=4,
        ...     num_competitors=4))
        >>> ids = torch.tensor([[5, 6, 7, 8, 9]])
        >>> feats = ext.extract(ids, response_mask=torch.tensor([[0, 0, 1, 1, 1]]))
        >>> tuple(feats.values.shape)
        (1, 4, 3, 10)
    """

    def __init__(
        self,
        model: nn.Module,
        config: FlowConfig | None = None,
        tokenizer: Any = None,
        architecture: ArchitectureSpec | None = None,
        special_token_ids: Iterable[int] | None = None,
        keep_geometry: bool = False,
    ) -> None:
        self.model = model
        self.config = config or FlowConfig()
        self.arch: ResolvedArchitecture = resolve_architecture(model, architecture)
        self.base = unwrap_model(model)
        dim = self.arch.readout.shape[1]
        if self.config.subspace_dim > dim:
            raise ValueError(
                f"subspace_dim={self.config.subspace_dim} exceeds the model's hidden size {dim}; "
                f"use FlowConfig(subspace_dim<={dim})."
            )
        vocab = self.arch.readout.shape[0]
        if self.config.num_competitors >= vocab:
            raise ValueError(
                f"num_competitors={self.config.num_competitors} must be smaller than the vocabulary ({vocab})."
            )
        self.keep_geometry = keep_geometry
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.special_ids = self._special_ids(tokenizer, special_token_ids)
        self.tokenizer = tokenizer
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}
        self._norms: list[nn.Module] | None = None
        self._betas: torch.Tensor | None = None
        self._readout: torch.Tensor | None = None
        # Gemma 2 caps its output logits; the token confidence reads them as the model's forward does.
        self._softcap: float | None = getattr(getattr(self.base, "config", None), "final_logit_softcapping", None)
        self._math_device: torch.device | None = None
        self._source: FeatureSource | None = None

    @property
    def source(self) -> FeatureSource:
        """This extractor's :class:`FeatureSource` (its config and the model's fingerprint, computed once)."""
        if self._source is None or self._source.flow_config != self.config:
            from hf_flowcheck.fingerprint import model_fingerprint

            self._source = FeatureSource(dataclasses.replace(self.config), model_fingerprint(self.model))
        return self._source

    # ------------------------------------------------------------------------------- set-up
    def _special_ids(self, tokenizer: Any, extra: Iterable[int] | None) -> set[int]:
        ids = set(self.eos_ids)
        for src in (getattr(self.base, "generation_config", None), getattr(self.base, "config", None)):
            for attr in ("pad_token_id", "bos_token_id"):
                v = getattr(src, attr, None) if src is not None else None
                if isinstance(v, int):
                    ids.add(v)
        if tokenizer is not None:
            ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        if extra is not None:
            ids.update(int(i) for i in extra)
        return ids

    def _prepare_math(self, device: torch.device) -> None:
        if self._math_device == device and self._norms is not None:
            return
        self._norms = [_float_copy(n).to(device) for n in self.arch.boundary_norms]
        dim = self.arch.readout.shape[1]
        for n in self._norms:
            # A verified closed form replaces torch.func.jvp (its per-call set-up dominates per-token work).
            n.flowcheck_jvp = closed_form_norm_jvp(n, dim)
        betas = []
        for n in self._norms:
            bias = getattr(n, "bias", None)
            betas.append(bias.detach().float() if isinstance(bias, torch.Tensor) else torch.zeros(dim, device=device))
        self._betas = torch.stack([b.to(device) for b in betas])
        w = self.arch.readout.detach()
        self._readout = w.to(device=device, dtype=torch.float32)
        self._math_device = device

    @property
    def readout(self) -> torch.Tensor:
        """The readout ``W`` ``[V, d]`` in float32 (on the device of the math)."""
        self._prepare_math(self._math_device or self.arch.readout.device)
        return self._readout

    @property
    def device(self) -> torch.device:
        """Device of the model's input embeddings (where ``input_ids`` go)."""
        return self._device()

    @property
    def norms(self) -> list[nn.Module]:
        """Float32 copies of ``N_0..N_B``."""
        self._prepare_math(self.arch.readout.device)
        return self._norms

    # ------------------------------------------------------------------------------- masks
    def _is_special(self, ids: torch.Tensor, extra: frozenset[int] = frozenset()) -> torch.Tensor:
        special_ids = self.special_ids | extra
        if not special_ids:
            return torch.zeros_like(ids, dtype=torch.bool)
        special = torch.tensor(sorted(special_ids), device=ids.device)
        return torch.isin(ids, special)

    def before_first_eos(
        self, ids: torch.Tensor, region: torch.Tensor, extra_eos: frozenset[int] = frozenset()
    ) -> torch.Tensor:
        """True for positions of ``region`` strictly before its first end-of-sequence token.

        ``extra_eos``: end ids of one ``generate`` call (its ``eos_token_id=``) besides the model's.
        """
        eos_ids = self.eos_ids | extra_eos
        if not eos_ids:
            return region
        eos = torch.isin(ids, torch.tensor(sorted(eos_ids), device=ids.device)) & region
        seen = torch.cumsum(eos.long(), dim=-1) > 0
        return region & ~seen

    def trailing_blank(self, ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """True for the whitespace-only tokens of ``region`` after its last content token (its terminators).

        Args:
            ids: ``[N, S]`` token ids.
            region: ``[N, S]`` bool, the answer tokens of each row.

        Returns:
            ``[N, S]`` bool; all False without a tokenizer (no way to tell whitespace tokens apart).
        """
        if not self._has_tokenizer():
            if not getattr(self, "_warned_no_tokenizer", False):
                self._warned_no_tokenizer = True
                warnings.warn(
                    "FlowExtractor has no tokenizer, so trailing whitespace/newline tokens stay in the score; "
                    "pass tokenizer= (FlowCheckedModelForCausalLM loads it), or FlowConfig(score_terminators=True) "
                    "to score them on purpose.",
                    stacklevel=3,
                )
            return torch.zeros_like(region)
        content = region & ~self._token_fact("blank", ids)
        content_after = torch.flip(torch.cumsum(torch.flip(content.long(), [-1]), -1), [-1]) > 0
        return region & ~content_after

    def _has_tokenizer(self) -> bool:
        return hasattr(self.tokenizer, "get_vocab") and hasattr(self.tokenizer, "batch_decode")

    def _token_fact(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """``ids``-shaped bool: column ``name`` of the tokenizer's :class:`TokenTable` (False past its vocabulary)."""
        key = (name, ids.device)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = getattr(token_table(self.tokenizer), name).to(ids.device)
        return table[ids.clamp(0, table.shape[0] - 1)] & (ids < table.shape[0])

    def word_tokens(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Which of ``ids`` have a word character: the tokens a culprit may point at.

        Args:
            ids: Token ids of any shape.

        Returns:
            Bool tensor shaped like ``ids``, or ``None`` without a tokenizer (then every token may).
        """
        return self._token_fact("has_word", ids) if self._has_tokenizer() else None

    def token_mask(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor | None,
        extra_eos: frozenset[int] = frozenset(),
    ) -> torch.Tensor:
        """The token mask ``M`` (spec §3) as a bool ``[N, S]`` tensor (``extra_eos``: see :meth:`before_first_eos`)."""
        valid = attention_mask.bool() & ~self._is_special(input_ids, extra_eos)
        if response_mask is None:
            if self.config.token_mask == "response":
                raise ValueError(
                    "token_mask='response' needs response_mask (1 on the answer tokens); pass it, or use "
                    "FlowConfig(token_mask='all') to score every non-special token."
                )
            return valid
        resp = response_mask.bool()
        kept_resp = self.before_first_eos(input_ids, resp, extra_eos) & valid
        if not self.config.score_terminators:
            kept_resp = kept_resp & ~self.trailing_blank(input_ids, kept_resp)
        if self.config.token_mask == "all":
            return (valid & ~resp) | kept_resp
        return kept_resp

    @property
    def reads_predicting_positions(self) -> bool:
        """Whether the features also need each scored token's predicting position (``p - 1``) captured."""
        return self.config.state_summary == "token_confidence"

    @staticmethod
    def predicting_positions(mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[N, S]`` bool: the real positions ``p - 1`` whose output chose a masked token ``p``."""
        before = torch.zeros_like(mask)
        before[:, :-1] = mask[:, 1:]
        return before & attention_mask.bool()

    def capture_mask(self, mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Positions whose states the features need: ``mask`` and, for the token confidence, ``p - 1``."""
        if not self.reads_predicting_positions:
            return mask
        return mask | self.predicting_positions(mask, attention_mask)

    # ------------------------------------------------------------------------------ extract
    @torch.no_grad()
    def extract(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
        sample_keys: list[int] | None = None,
    ) -> FlowFeatures:
        """Teacher-forced flow signatures.

        Args:
            input_ids: ``[N, S]`` prompt followed by the answer (left or right padding).
            attention_mask: ``[N, S]``; defaults to all ones.
            response_mask: ``[N, S]``, 1 on the answer tokens (needed for ``token_mask='response'``).
            sample_keys: Optional per-sample keys for the cap sampler (default: hash of the tokens).

        Returns:
            :class:`FlowFeatures` over the masked tokens.
        """
        input_ids = self._check_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = self.token_mask(input_ids, attention_mask, response_mask)
        last = self._last_needed(mask)
        if last < 0:
            return self._assemble(input_ids, attention_mask, mask, None, sample_keys)
        rows, cols = self.capture_mask(mask, attention_mask)[:, : last + 1].nonzero(as_tuple=True)
        states = self._capture(input_ids[:, : last + 1], attention_mask[:, : last + 1], rows, cols)
        return self._assemble(input_ids, attention_mask, mask, states, sample_keys)

    def _capture(self, ids: torch.Tensor, att: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> CapturedStates:
        """States at ``(rows, cols)`` from one teacher-forced forward of ``ids`` ``[N, S]``."""

        def selector(call: int, batch: int, seq: int, device: torch.device):
            return (rows, cols, cols) if call == 0 else None

        with FlowRecorder(self.arch, selector, capacity=rows.numel()) as rec:
            self.forward(ids.to(self._device()), att.to(self._device()))
            return rec.result()

    def _token_confidence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        states: CapturedStates,
        table: torch.Tensor,
        row: int,
        want: torch.Tensor,
        cache: StreamCache | None,
    ) -> torch.Tensor:
        """``[3]`` token confidence of row ``row``'s tokens at ``want`` (each read at ``p - 1``)."""
        prev = want - 1
        # A token with nothing before it (position 0, or a pad) was never predicted: it has no probability.
        keep = (prev >= 0) & attention_mask[row].to(prev.device).bool()[prev.clamp_min(0)]
        want, prev = want[keep], prev[keep]
        idx = table[row, prev]
        if bool((idx < 0).any()):
            missing = prev[idx < 0].tolist()
            raise RuntimeError(f"No captured states for row {row} at predicting positions {missing}; capture bug.")
        tokens = input_ids[row, want].to(idx.device)

        def compute(sel: Any) -> torch.Tensor:
            return token_confidence_rows(
                states.r[idx[sel], -1], self._norms[-1], self._readout, tokens[sel], self._softcap
            )

        if cache is None:
            rows = compute(slice(None))
        else:
            rows = _cached_rows(cache.confidence, [(row, p) for p in want.tolist()], compute, dim=0)
        return token_confidence_summary(rows)

    @torch.no_grad()
    def token_confidence(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The token confidence of the masked tokens alone, without the flow signatures.

        What ``FlowConfig(state_summary='token_confidence')`` puts in :attr:`FlowFeatures.states`
        (the same code), at the cost of one forward: for adding the channel to features already
        extracted without it.

        Args:
            input_ids: ``[N, S]`` prompt followed by the answer.
            attention_mask: ``[N, S]``; defaults to all ones.
            response_mask: ``[N, S]``, 1 on the answer tokens (needed for ``token_mask='response'``).

        Returns:
            ``[N, 1, 3]`` float32 (:data:`~hf_flowcheck.readout.TOKEN_CONFIDENCE_NAMES`), zeros for
            samples without tokens.
        """
        input_ids = self._check_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = self.token_mask(input_ids, attention_mask, response_mask)
        out = torch.zeros(input_ids.shape[0], 1, 3)
        last = self._last_needed(mask)
        if last < 0:
            return out
        rows, cols = self.predicting_positions(mask, attention_mask)[:, : last + 1].nonzero(as_tuple=True)
        if rows.numel() == 0:
            return out
        states = self._capture(input_ids[:, : last + 1], attention_mask[:, : last + 1], rows, cols)
        self._prepare_math(states.r.device)
        table = torch.full(mask.shape, -1, dtype=torch.long, device=states.r.device)
        table[states.rows, states.positions] = torch.arange(states.rows.numel(), device=states.r.device)
        for i in range(input_ids.shape[0]):
            want = mask[i].nonzero().squeeze(-1).to(states.r.device)
            if want.numel():
                out[i, 0] = self._token_confidence(input_ids, attention_mask, states, table, i, want, None).cpu()
        return out

    def _lens(self, r_after: torch.Tensor, row: int, want: torch.Tensor, cache: StreamCache | None) -> torch.Tensor:
        """``[R, B, d]`` states after each block of row ``row``'s tokens at ``want`` -> ``[B, R, 4]``."""
        cfg = self.config

        def compute(sel: Any) -> torch.Tensor:
            return lens_features(r_after[sel], self._norms[-1], self._readout, cfg.num_competitors, cfg.lens_candidates)

        if cache is None:
            return compute(slice(None))
        return _cached_rows(cache.lens, [(row, p) for p in want.tolist()], compute, dim=1)

    def _streamed_features(
        self, states: CapturedStates, idx: torch.Tensor, row: int, want: torch.Tensor, key: int, cache: StreamCache
    ) -> tuple[torch.Tensor, SampleGeometry]:
        """One row's spec features with the per-token updates cached and the bases refitted per ``cache.refit``."""
        r, o, m = (rows_of(t, idx) for t in (states.r, states.o, states.m))
        keys = [(row, p) for p in want.tolist()]
        updates = _cached_rows(cache.updates, keys, lambda sel: block_updates(r[sel], o[sel], m[sel], self._norms), 0)
        n_tok = len(keys)
        fitted = cache.bases.get(row)
        if cache.refit == "always" or fitted is None or n_tok >= 2 * fitted[0]:
            layout = window_layout(o.shape[1], self.config.window_length, self.config.window_stride)
            h, _ = boundary_states(r, self._norms, self._betas, self.config.boundary)
            cache.bases[row] = (n_tok, fit_sample_bases(h, self._readout, layout, self.config, key))
        bases = cache.bases[row][1]
        return sample_flow_features(
            r, o, m, self._norms, self._betas, self._readout, self.config, key, bases=bases, updates=updates
        )

    def _device(self) -> torch.device:
        return input_device(self.base)

    @staticmethod
    def _check_ids(input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be a 2-D LongTensor [batch, seq], got {getattr(input_ids, 'shape', type(input_ids))}."
            )
        return input_ids

    @staticmethod
    def _last_needed(mask: torch.Tensor) -> int:
        if not bool(mask.any()):
            return -1
        return int(mask.any(0).nonzero().max())

    def forward(self, ids: torch.Tensor, att: torch.Tensor, **extra: Any) -> Any:
        """One cache-free forward of ``ids`` ``[N, S]`` (only the last position's logits)."""
        return self.model(input_ids=ids, **{**forward_kwargs(self.base, att), **extra})

    def features_from_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        states: CapturedStates,
        cache: StreamCache | None = None,
    ) -> FlowFeatures:
        """Signatures of the masked tokens of ``input_ids`` from already captured states.

        Args:
            input_ids: ``[N, S]`` the sequences so far.
            attention_mask: ``[N, S]`` (its real tokens give each sample's key).
            mask: ``[N, S]`` token mask; every masked position must have been captured.
            states: From :meth:`FlowRecorder.result`.
            cache: A :class:`StreamCache` for these same captured states (a streaming caller passes
                one per ``generate`` call); filled in place.
        """
        return self._assemble(input_ids, attention_mask, mask, states, None, cache)

    # ------------------------------------------------------------------------------ assembly
    def _assemble(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        states: CapturedStates | None,
        sample_keys: list[int] | None,
        cache: StreamCache | None = None,
    ) -> FlowFeatures:
        n = input_ids.shape[0]
        n_blocks = self.arch.num_blocks
        n_feat = self.config.num_features
        counts = mask.sum(-1)
        t_max = int(counts.max()) if n else 0
        device = states.r.device if states is not None else self.arch.readout.device
        values = torch.zeros(n, n_blocks, t_max, n_feat, device=device)
        valid = torch.zeros(n, n_blocks, t_max, dtype=torch.bool, device=device)
        positions = torch.full((n, t_max), -1, dtype=torch.long, device=device)
        summary = self.config.state_summary
        states_out = None
        if summary == "token_confidence":
            states_out = torch.zeros(n, 1, 3, device=device)
        elif summary != "none":
            dim = self.arch.readout.shape[1]
            states_out = torch.zeros(n, n_blocks + 1, dim, device=device)
        keys: list[int] = []
        geometry: list[SampleGeometry | None] | None = [] if self.keep_geometry else None
        if states is not None:
            done = cache.checked if cache is not None and cache.checked <= states.r.shape[0] else 0
            states.check_finite(done)
            if cache is not None:
                cache.checked = states.r.shape[0]
            self._prepare_math(device)
            rows, pos = states.rows, states.positions
            # Index of each captured (row, position) in a dense [N, S] table.
            table = torch.full(mask.shape, -1, dtype=torch.long, device=device)
            table[rows, pos] = torch.arange(rows.numel(), device=device)
        for i in range(n):
            want = mask[i].nonzero().squeeze(-1).to(device)
            if sample_keys is not None:
                key = int(sample_keys[i])
            else:
                last = int(want.max()) if want.numel() else -1
                row_ids = input_ids[i, : last + 1][attention_mask[i, : last + 1].bool()]
                key = token_key(row_ids)
            keys.append(key)
            if want.numel() == 0 or states is None:
                if geometry is not None:
                    geometry.append(None)
                continue
            idx = table[i, want]
            if bool((idx < 0).any()):
                missing = want[idx < 0].tolist()
                raise RuntimeError(f"No captured states for row {i} at positions {missing}; capture selector bug.")
            r_sel = rows_of(states.r, idx)  # [R, B+1, d], positions ascending
            if cache is None:
                o, m = rows_of(states.o, idx), rows_of(states.m, idx)
                feats, geo = sample_flow_features(
                    r_sel, o, m, self._norms, self._betas, self._readout, self.config, key
                )
            else:
                feats, geo = self._streamed_features(states, idx, i, want, key, cache)
            if self.config.lens_features:
                feats = torch.cat([feats, self._lens(r_sel[:, 1:], i, want, cache)], dim=-1)
            if summary == "token_confidence":
                states_out[i, 0] = self._token_confidence(input_ids, attention_mask, states, table, i, want, cache)
            elif states_out is not None:
                states_out[i] = r_sel[-1] if summary == "last" else r_sel.mean(0)
            r_i = want.numel()
            values[i, :, :r_i] = feats
            valid[i, :, :r_i] = True
            positions[i, :r_i] = want
            if geometry is not None:
                geometry.append(geo)
        ids = input_ids.to(device).gather(1, positions.clamp_min(0))
        words = self.word_tokens(ids)
        return FlowFeatures(
            values, valid, positions, self.config.feature_names, keys, geometry, states_out, self.source,
            None if words is None else words & (positions >= 0),
        )  # fmt: skip
