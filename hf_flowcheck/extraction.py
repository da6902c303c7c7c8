"""`FlowExtractor`: flow signatures from a model, teacher-forced or while it generates."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import ArchitectureSpec, ResolvedArchitecture, resolve_architecture, unwrap_model
from hf_flowcheck.capture import CapturedStates, FlowRecorder
from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.signatures import SampleGeometry, lens_features, sample_flow_features, token_key


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
            (``FlowConfig.state_summary``), zeros for samples without tokens; ``None`` when off.
    """

    values: torch.Tensor
    valid: torch.Tensor
    positions: torch.Tensor
    names: tuple[str, ...]
    sample_keys: list[int] = field(default_factory=list)
    geometry: list[SampleGeometry | None] | None = None
    states: torch.Tensor | None = None

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
            self.states,
        )  # fmt: skip

    def __getitem__(self, idx: int | slice) -> FlowFeatures:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        geo = self.geometry[idx] if self.geometry is not None else None
        states = None if self.states is None else self.states[idx]
        return FlowFeatures(
            self.values[idx], self.valid[idx], self.positions[idx], self.names, self.sample_keys[idx], geo, states
        )


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


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
        self.special_ids = self._special_ids(tokenizer, special_token_ids)
        self.eos_ids = self._eos_ids(tokenizer)
        self._norms: list[nn.Module] | None = None
        self._betas: torch.Tensor | None = None
        self._readout: torch.Tensor | None = None
        self._math_device: torch.device | None = None
        #: Bytes of the capture buffers of the last call (diagnostics and benchmarks).
        self.last_capture_bytes = 0
        #: The recorder of a ``generate`` call in progress (for streaming checks), else ``None``.
        self.active_recorder: FlowRecorder | None = None
        self._active_prompt_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------- set-up
    def _eos_ids(self, tokenizer: Any) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.base, "generation_config", None), getattr(self.base, "config", None)):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            ids.add(int(tokenizer.eos_token_id))
        return ids

    def _special_ids(self, tokenizer: Any, extra: Iterable[int] | None) -> set[int]:
        ids = set(self._eos_ids(tokenizer))
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
    def _is_special(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.special_ids:
            return torch.zeros_like(ids, dtype=torch.bool)
        special = torch.tensor(sorted(self.special_ids), device=ids.device)
        return torch.isin(ids, special)

    def _before_first_eos(self, ids: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        """True for positions of ``region`` strictly before its first end-of-sequence token."""
        if not self.eos_ids:
            return region
        eos = torch.isin(ids, torch.tensor(sorted(self.eos_ids), device=ids.device)) & region
        seen = torch.cumsum(eos.long(), dim=-1) > 0
        return region & ~seen

    def token_mask(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The token mask ``M`` (spec §3) as a bool ``[N, S]`` tensor."""
        valid = attention_mask.bool() & ~self._is_special(input_ids)
        if response_mask is None:
            if self.config.token_mask == "response":
                raise ValueError(
                    "token_mask='response' needs response_mask (1 on the answer tokens); pass it, or use "
                    "FlowConfig(token_mask='all') to score every non-special token."
                )
            return valid
        resp = response_mask.bool()
        kept_resp = self._before_first_eos(input_ids, resp) & valid
        if self.config.token_mask == "all":
            return (valid & ~resp) | kept_resp
        return kept_resp

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
        ids, att, msk = input_ids[:, : last + 1], attention_mask[:, : last + 1], mask[:, : last + 1]
        rows, cols = msk.nonzero(as_tuple=True)

        def selector(call: int, batch: int, seq: int, device: torch.device):
            return (rows, cols, cols) if call == 0 else None

        with FlowRecorder(self.arch, selector, capacity=rows.numel()) as rec:
            self._forward(ids.to(self._device()), att.to(self._device()))
            states = rec.result()
        self.last_capture_bytes = rec.nbytes
        return self._assemble(input_ids, attention_mask, mask, states, sample_keys)

    def _device(self) -> torch.device:
        emb = self.base.get_input_embeddings()
        return emb.weight.device

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

    def _forward(self, ids: torch.Tensor, att: torch.Tensor, **extra: Any) -> Any:
        kwargs: dict[str, Any] = {"attention_mask": att, "use_cache": False}
        fwd = self.base.forward
        if _accepts(fwd, "position_ids"):
            kwargs["position_ids"] = (att.long().cumsum(-1) - 1).clamp_min(0)
        if _accepts(fwd, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1
        kwargs.update(extra)
        return self.model(input_ids=ids, **kwargs)

    # ----------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, FlowFeatures]:
        """Generate and capture flow signatures of the generated tokens in the same pass.

        Args:
            input_ids: ``[N, P]`` prompts (left padding for batches).
            attention_mask: ``[N, P]``.
            mask_fn: Optional edit of the final ``[N, S]`` token mask (the streaming check uses it to
                leave an abstention message out of the score).
            **generate_kwargs: Passed to ``model.generate`` (``num_beams > 1`` is refused).

        Returns:
            ``(output, features)``: what ``model.generate`` returns for these arguments, and the
            :class:`FlowFeatures` of the generated tokens (plus the prompt's for ``token_mask='all'``).
        """
        input_ids = self._check_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_generate_kwargs(generate_kwargs)
        gen_cfg = generate_kwargs.get("generation_config") or getattr(self.base, "generation_config", None)
        want_dict = generate_kwargs.pop(
            "return_dict_in_generate", bool(getattr(gen_cfg, "return_dict_in_generate", False))
        )
        prompt_len = input_ids.shape[1]
        prompt_mask = (
            self.token_mask(input_ids, attention_mask, None)
            if self.config.token_mask == "all"
            else torch.zeros_like(input_ids, dtype=torch.bool)
        )
        p_rows, p_cols = prompt_mask.nonzero(as_tuple=True)
        max_new = generate_kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None) or 32

        def selector(call: int, batch: int, seq: int, device: torch.device):
            if call == 0:
                return (p_rows, p_cols, p_cols) if p_rows.numel() else None
            rows = torch.arange(batch, device=device)
            cols = torch.full((batch,), seq - 1, device=device, dtype=torch.long)
            return rows, cols, torch.full_like(rows, prompt_len + call - 1)

        capacity = p_rows.numel() + input_ids.shape[0] * int(max_new)
        with FlowRecorder(self.arch, selector, capacity=capacity) as rec:
            self.active_recorder = rec
            self._active_prompt_mask = attention_mask
            try:
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    return_dict_in_generate=True,
                    **generate_kwargs,
                )
            finally:
                self.active_recorder = None
                self._active_prompt_mask = None
            seqs = out.sequences
            full_att = torch.cat(
                [attention_mask.to(seqs.device), torch.ones_like(seqs[:, prompt_len:], dtype=attention_mask.dtype)],
                dim=1,
            )
            resp = torch.zeros_like(seqs, dtype=torch.bool)
            resp[:, prompt_len:] = True
            mask = self.token_mask(seqs, full_att, resp)
            if mask_fn is not None:
                mask = mask_fn(mask)
            if seqs.shape[1] > prompt_len and bool(mask[:, -1].any()):
                # generate never feeds its last token back; one more step gives its states.
                self._final_step(out, seqs, full_att, rec.num_calls)
            states = rec.result()
        self.last_capture_bytes = rec.nbytes
        feats = self._assemble(seqs, full_att, mask, states, None)
        return (out if want_dict else seqs), feats

    def _check_generate_kwargs(self, kw: dict[str, Any]) -> None:
        gen_cfg = kw.get("generation_config") or getattr(self.base, "generation_config", None)
        beams = kw.get("num_beams", getattr(gen_cfg, "num_beams", 1) if gen_cfg is not None else 1) or 1
        if beams > 1:
            raise ValueError(
                f"num_beams={beams} is not supported: beam search reorders and discards hypotheses, so "
                "per-token states cannot be attributed while it runs. Use greedy or sampling "
                "(num_beams=1), or beam-search first and score the result with FlowExtractor.extract()."
            )
        for key in ("assistant_model", "prompt_lookup_num_tokens"):
            if kw.get(key) is not None:
                raise ValueError(f"{key} (assisted decoding) is not supported with flow capture; remove it.")
        if "inputs_embeds" in kw:
            raise ValueError("inputs_embeds is not supported; pass input_ids.")

    def _final_step(self, out: Any, seqs: torch.Tensor, full_att: torch.Tensor, call: int) -> None:
        cache = getattr(out, "past_key_values", None)
        cache_len = seqs.shape[1] - 1
        if self._can_extend_and_crop(cache, cache_len):
            pos = (full_att.long().cumsum(-1) - 1).clamp_min(0)[:, -1:]
            kwargs: dict[str, Any] = {"attention_mask": full_att, "past_key_values": cache, "use_cache": True}
            fwd = self.base.forward
            if _accepts(fwd, "position_ids"):
                kwargs["position_ids"] = pos
            if _accepts(fwd, "cache_position"):
                kwargs["cache_position"] = torch.tensor([cache_len], device=seqs.device)
            if _accepts(fwd, "logits_to_keep"):
                kwargs["logits_to_keep"] = 1
            self.model(input_ids=seqs[:, -1:], **kwargs)
            cache.crop(-1)  # give the caller back the cache generate produced
            return
        # No croppable cache: replay the whole sequence once; the selector keeps its last position.
        self._forward(seqs, full_att)

    @staticmethod
    def _can_extend_and_crop(cache: Any, cache_len: int) -> bool:
        if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
            return False
        if cache.get_seq_length() != cache_len:
            return False
        for layer in getattr(cache, "layers", []):
            window = getattr(layer, "sliding_window", None)
            if window is not None and cache_len + 1 >= window:
                return False  # a full sliding-window layer cannot be cropped back
            if type(layer).__name__.startswith("Static"):
                return False
        return True

    def features_from_states(self, input_ids: torch.Tensor, mask: torch.Tensor, states: CapturedStates) -> FlowFeatures:
        """Signatures of the masked tokens of ``input_ids`` from already captured states.

        During a ``generate`` call (streaming checks) the prompt's attention mask is taken from
        the running call so that sample keys match the final features.

        Args:
            input_ids: ``[N, S]`` the sequences so far.
            mask: ``[N, S]`` token mask; every masked position must have been captured.
            states: From :meth:`FlowRecorder.result`.
        """
        att = torch.ones_like(input_ids)
        prompt = self._active_prompt_mask
        if prompt is not None:
            att[:, : prompt.shape[1]] = prompt.to(att.device)
        return self._assemble(input_ids, att, mask, states, None)

    # ------------------------------------------------------------------------------ assembly
    def _assemble(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        states: CapturedStates | None,
        sample_keys: list[int] | None,
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
        if summary != "none":
            dim = self.arch.readout.shape[1]
            states_out = torch.zeros(n, n_blocks + 1, dim, device=device)
        keys: list[int] = []
        geometry: list[SampleGeometry | None] | None = [] if self.keep_geometry else None
        if states is not None:
            states.check_finite()
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
            feats, geo = sample_flow_features(
                states.r[idx],
                states.o[idx],
                states.m[idx],
                self._norms,
                self._betas,
                self._readout,
                self.config,
                key,
            )
            if self.config.lens_features:
                lens = lens_features(states.r[idx][:, 1:], self._norms[-1], self._readout, self.config.num_competitors)
                feats = torch.cat([feats, lens], dim=-1)
            if states_out is not None:
                r_sel = states.r[idx]  # [R, B+1, d], positions ascending
                states_out[i] = r_sel[-1] if summary == "last" else r_sel.mean(0)
            r_i = want.numel()
            values[i, :, :r_i] = feats
            valid[i, :, :r_i] = True
            positions[i, :r_i] = want
            if geometry is not None:
                geometry.append(geo)
        return FlowFeatures(values, valid, positions, self.config.feature_names, keys, geometry, states_out)
