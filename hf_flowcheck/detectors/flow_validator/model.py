"""The flow validator network (:class:`FlowValidator`): events in, one sample score, a culprit and token risks out."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.detectors.checkpoint import CheckpointError, SavedDetectorMixin, jsonable, load_safetensors_strict
from hf_flowcheck.detectors.flow_validator.card import model_card_text
from hf_flowcheck.detectors.flow_validator.config import ValidatorConfig
from hf_flowcheck.detectors.flow_validator.output import (
    FlowValidatorOutput,
    culprit_cells,
    mean_present,
    riskiest_token_cells,
    token_pool_attention,
    token_pool_max,
    word_token_cells,
)
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.fingerprint import CHECKED_FIELDS, check_fingerprint, model_fingerprint

__all__ = ["FlowValidator"]


class FlowValidator(
    nn.Module,
    SavedDetectorMixin,
    PyTorchModelHubMixin,
    library_name="hf_flowcheck",
    tags=["hf_flowcheck", "hallucination-detection", "flow-signatures"],
):
    """Flow-signature hallucination detector (paper B.9).

    Args:
        validator_config: The network's shape; a :class:`ValidatorConfig` or its dict.
        flow_config: The :class:`~hf_flowcheck.FlowConfig` (or its dict) the features were
            computed with; stored so that users extract features the same way.
        base_fingerprint: :func:`hf_flowcheck.fingerprint.model_fingerprint` of the base model the
            features came from; :meth:`check_compatible` compares a model against it.
        training_metadata: JSON-serialisable facts about training (hyperparameters, history,
            ``"evaluation"``: :func:`~hf_flowcheck.metrics.evaluate_scores` results,
            ``"command"``: the command that produced them). Shown in the model card.

    Score direction: ``scores`` lie in ``[0, 1]``, higher = more likely hallucinated.

    Example:
        >>> v = FlowValidator(ValidatorConfig(num_features=8, hidden=16, embed=8, gru_hidden=8))
        >>> v.eval()(torch.randn(1, 3, 2, 8), torch.ones(1, 3, 2, dtype=torch.bool)).culprit_block.shape
        torch.Size([1])
    """

    FORMAT_VERSION: ClassVar[int] = 1
    CONFIG_KEY: ClassVar[str] = "validator_config"
    WHAT: ClassVar[str] = "validator"

    def __init__(
        self,
        validator_config: ValidatorConfig | dict | None = None,
        *,
        flow_config: FlowConfig | dict | None = None,
        base_fingerprint: dict | None = None,
        training_metadata: dict | None = None,
    ) -> None:
        super().__init__()
        if validator_config is None:
            raise ValueError(
                "FlowValidator needs a validator_config, e.g. FlowValidator(ValidatorConfig(num_features=10)) "
                "or ValidatorConfig.from_feature_names(features.names)."
            )
        cfg = ValidatorConfig.from_dict(validator_config)
        if isinstance(flow_config, dict):
            flow_config = FlowConfig.from_dict(flow_config)
        if flow_config is not None and not isinstance(flow_config, FlowConfig):
            raise ValueError(f"flow_config must be a FlowConfig or its dict, got {type(flow_config).__name__}.")
        if (
            flow_config is not None
            and flow_config.state_summary == "token_confidence"
            and cfg.state_dim
            and (cfg.state_dim, tuple(cfg.state_blocks)) != (3, (0,))
        ):
            raise ValueError(
                "flow_config.state_summary='token_confidence' gives [N, 1, 3] states, but this validator reads "
                f"state_dim={cfg.state_dim}, state_blocks={tuple(cfg.state_blocks)}; "
                "use state_dim=3, state_blocks=(0,)."
            )
        if base_fingerprint is not None and not isinstance(base_fingerprint, dict):
            raise ValueError(
                f"base_fingerprint must be a dict from hf_flowcheck.fingerprint.model_fingerprint(), "
                f"got {type(base_fingerprint).__name__}."
            )
        if training_metadata is not None and not isinstance(training_metadata, dict):
            raise ValueError(f"training_metadata must be a dict, got {type(training_metadata).__name__}.")
        self.config = cfg
        self.flow_config: FlowConfig | None = flow_config
        self.base_fingerprint: dict[str, Any] | None = dict(base_fingerprint) if base_fingerprint else None
        self.training_metadata: dict[str, Any] = dict(training_metadata or {})
        self.members: nn.ModuleList | None = None
        # (a, b): the answer, event and token logits leave as a * logit + b (a > 0, so no ranking and
        # no culprit changes). Identity until calibrate_validator fits it on validation answers:
        # class-weighted training centres scores on the balanced point, not on the observed rate.
        self.register_buffer("logit_calibration", torch.tensor([1.0, 0.0]))
        if cfg.members > 1:
            # Composition: each member is a one-member validator of the same shape (its own input
            # scaling, encoder, head and state branch), initialised from the RNG in turn.
            one = dataclasses.replace(cfg, members=1)
            self.members = nn.ModuleList(FlowValidator(one) for _ in range(cfg.members))
            return

        f, p = cfg.num_features, cfg.dropout
        # Affine input scaling fitted on the train split by fit_input_transform: per feature, or per
        # (block, feature) because most of each motion feature's variance is its depth.
        shape = (cfg.num_blocks, f) if cfg.input_transform == "block_log_standardize" else (f,)
        self.register_buffer("feature_shift", torch.zeros(shape))
        self.register_buffer("feature_scale", torch.ones(shape))
        self.input_norm = nn.LayerNorm(f)
        self.block_embed = nn.Embedding(cfg.num_blocks, cfg.block_embedding) if cfg.block_embedding else None
        self.mlp = nn.Sequential(
            nn.Linear(f + cfg.block_embedding, cfg.hidden),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(cfg.hidden, cfg.embed),
            nn.GELU(),
            nn.Dropout(p),
        )
        self.embed_norm = nn.LayerNorm(cfg.embed)
        if cfg.head == "gru":
            self.gru = nn.GRU(cfg.embed, cfg.gru_hidden, num_layers=1, batch_first=True)
            self.head = nn.Linear(cfg.gru_hidden, 1)
        elif cfg.head == "depth":
            self.head = nn.Linear(cfg.embed, 1)  # event logit: picks the culprit token, and a block input
            self.depth_conv = nn.Conv1d(2 * cfg.embed + 1, cfg.embed, kernel_size=3, padding=1)
            self.depth_dropout = nn.Dropout(p)
            self.depth_out = nn.Linear(cfg.embed, 1)  # block logit
        else:
            self.head = nn.Linear(cfg.embed, 1)  # event logit
            self.attend = nn.Linear(cfg.embed, 1)  # attention score of the event in the pooled logit
        if cfg.state_dim:
            n_states = len(cfg.state_blocks)
            self.register_buffer("state_shift", torch.zeros(n_states, cfg.state_dim))
            self.register_buffer("state_scale", torch.ones(n_states, cfg.state_dim))
            self.state_dropout = nn.Dropout(p)
            self.state_head = nn.Linear(n_states * cfg.state_dim, 1)

    # ------------------------------------------------------------------------------- forward
    def _check_inputs(self, values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if not isinstance(values, torch.Tensor) or values.dim() != 4:
            raise ValueError(
                f"values must be a [N, B, T, F] float tensor, got {getattr(values, 'shape', type(values).__name__)}."
            )
        if values.shape[-1] != self.config.num_features:
            raise ValueError(
                f"values has F={values.shape[-1]} features but this validator expects "
                f"num_features={self.config.num_features}; extract features with the validator's flow_config "
                f"({'features=' + repr(self.flow_config.features) if self.flow_config else 'see config.json'})."
            )
        if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != tuple(values.shape[:3]):
            raise ValueError(
                f"valid must be a [N, B, T] = {list(values.shape[:3])} bool tensor, "
                f"got {getattr(valid, 'shape', type(valid).__name__)}."
            )
        valid = valid if valid.dtype == torch.bool else valid != 0
        bad = (~torch.isfinite(values).all(-1)) & valid
        if bool(bad.any()):
            rows = sorted({int(i) for i in bad.nonzero()[:, 0].tolist()})[:10]
            raise ValueError(
                f"values holds NaN/inf at valid events of sample(s) {rows}; non-finite features mean a broken "
                "extraction (check the base model's dtype, e.g. load it in float32) or mark those cells invalid."
            )
        return valid

    def _transform_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, B, T, F]`` raw features -> scaled features (same shape)."""
        mode = self.config.input_transform
        if mode == "none":
            return x
        if mode != "standardize":
            x = torch.sign(x) * torch.log1p(x.abs())
        if mode == "block_log_standardize":
            return (x - self.feature_shift[None, :, None, :]) / self.feature_scale[None, :, None, :]
        return (x - self.feature_shift) / self.feature_scale

    def _check_states(self, states: torch.Tensor | None, n: int) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.state_dim:
            return None
        if states is None:
            raise ValueError(
                "This is a flow + state validator: it also reads residual-state summaries, but none were given. "
                "Extract features with its flow_config (state_summary="
                f"{self.flow_config.state_summary if self.flow_config else 'last'!r}) and pass FlowFeatures.states."
            )
        if states.dim() != 3 or states.shape[0] != n or states.shape[2] != cfg.state_dim:
            raise ValueError(
                f"states must be [N={n}, B+1, d={cfg.state_dim}], got {list(states.shape)}; extract them from the "
                "same base model."
            )
        if max(cfg.state_blocks) >= states.shape[1]:
            raise ValueError(f"states has {states.shape[1]} boundaries; state_blocks={cfg.state_blocks} needs more.")
        return states

    @torch.no_grad()
    def fit_input_transform(
        self, values: torch.Tensor, valid: torch.Tensor, states: torch.Tensor | None = None
    ) -> None:
        """Set the input shift/scale from training events (and state summaries, for the state branch).

        Args:
            values: ``[N, B, T, F]`` training features.
            valid: ``[N, B, T]`` bool.
            states: ``[N, B+1, d]`` training state summaries (flow + state validators only).
        """
        if self.members is not None:
            for member in self.members:
                member.fit_input_transform(values, valid, states)
            return
        mode = self.config.input_transform
        if mode != "none":
            x = values.to(self.feature_shift.dtype)
            if mode != "standardize":
                x = torch.sign(x) * torch.log1p(x.abs())
            m = valid.bool()
            if int(m.sum()) < 2:
                raise ValueError("fit_input_transform needs at least two valid training events.")
            if mode == "block_log_standardize":
                if x.shape[1] != self.config.num_blocks:
                    raise ValueError(
                        f"the features have B={x.shape[1]} blocks but ValidatorConfig.num_blocks="
                        f"{self.config.num_blocks}; set it to FlowFeatures.num_blocks."
                    )
                w = m[..., None].to(x.dtype)  # [N, B, T, 1]
                cnt = w.sum((0, 2)).clamp_min(1.0)  # [B, 1]
                mean = (x * w).sum((0, 2)) / cnt
                var = (((x - mean[None, :, None]) ** 2) * w).sum((0, 2)) / (cnt - 1).clamp_min(1.0)
                self.feature_shift.copy_(mean)
                self.feature_scale.copy_(var.sqrt().clamp_min(1e-6))
            else:
                ev = x[m]
                self.feature_shift.copy_(ev.mean(0))
                self.feature_scale.copy_(ev.std(0).clamp_min(1e-6))
        states = self._check_states(states, values.shape[0])
        if states is not None:
            self.fit_state_transform(states)

    @torch.no_grad()
    def fit_state_transform(self, states: torch.Tensor) -> None:
        """Set the state branch's input shift/scale alone (e.g. from more answers than have flow features).

        Args:
            states: ``[M, B+1, d]`` training state summaries, ``M >= 2``.
        """
        if self.members is not None:
            for member in self.members:
                member.fit_state_transform(states)
            return
        if not isinstance(states, torch.Tensor):
            raise ValueError(f"states must be a [M, B+1, d] tensor, got {type(states).__name__}.")
        states = self._check_states(states, states.shape[0])
        if states is None:
            raise ValueError("fit_state_transform: this validator has no state branch (state_dim=0).")
        if states.shape[0] < 2:
            raise ValueError(f"fit_state_transform needs at least two answers' states, got {states.shape[0]}.")
        sel = states[:, list(self.config.state_blocks)].to(self.state_shift.dtype)
        self.state_shift.copy_(sel.mean(0))
        self.state_scale.copy_(sel.std(0).clamp_min(1e-6))

    def forward(
        self, values: torch.Tensor, valid: torch.Tensor, states: torch.Tensor | None = None
    ) -> FlowValidatorOutput:
        """Score samples from their event features.

        Args:
            values: ``[N, B, T, F]`` event features (content of invalid cells is ignored).
            valid: ``[N, B, T]`` bool, true for real events.
            states: ``[N, B+1, d]`` residual-state summaries; required by flow + state validators
                (``config.state_dim > 0``), ignored otherwise.

        Returns:
            :class:`FlowValidatorOutput` (``culprit_position`` is ``None``; see :meth:`score_features`).
        """
        out = (
            self._ensemble_forward(values, valid, states)
            if self.members is not None
            else self._forward(values, valid, states)
        )
        return self._calibrated(out)

    @property
    def calibration(self) -> tuple[float, float]:
        """``(a, b)`` of the logit map ``a * logit + b`` applied to every output logit (``(1, 0)``: none)."""
        a, b = self.logit_calibration.tolist()
        return float(a), float(b)

    def set_calibration(self, scale: float, bias: float) -> None:
        """Set the logit map ``scale * logit + bias`` (fitted by Platt scaling on validation answers).

        Raises:
            ValueError: ``scale`` is not a positive finite number or ``bias`` not finite (a non-positive
                scale would reverse the ranking and the culprit).
        """
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(bias)):
            raise ValueError(
                f"calibration scale={scale!r}, bias={bias!r}: the scale must be a positive finite number and the "
                "bias finite. A fit with scale <= 0 means the validator ranks those answers the wrong way round; "
                "do not calibrate it on them."
            )
        self.logit_calibration.copy_(torch.tensor([float(scale), float(bias)]))

    def _calibrated(self, out: FlowValidatorOutput) -> FlowValidatorOutput:
        a, b = self.calibration
        if (a, b) == (1.0, 0.0):
            return out
        logits = out.logits * a + b
        return dataclasses.replace(
            out,
            logits=logits,
            scores=torch.sigmoid(logits),
            event_logits=out.event_logits * a + b,  # -inf (no event) stays -inf
            token_logits=out.token_logits * a + b,
        )

    def _forward(self, values: torch.Tensor, valid: torch.Tensor, states: torch.Tensor | None) -> FlowValidatorOutput:
        valid = self._check_inputs(values, valid)
        n, b, t, f = values.shape
        states = self._check_states(states, n)
        dev = values.device
        dtype = self.head.weight.dtype
        cfg = self.config
        if cfg.num_blocks and b != cfg.num_blocks and (cfg.block_embedding or cfg.input_transform.startswith("block")):
            raise ValueError(
                f"values has B={b} blocks but this validator was trained on a {cfg.num_blocks}-block model; "
                "score features of its base model."
            )
        e = b * t
        x = self._transform_inputs(values.to(dtype)).reshape(n, e, f)
        if self.block_embed is not None:
            blocks = torch.arange(b, device=dev).repeat_interleave(t)  # depth-major event order
            x = torch.cat([x, self.block_embed(blocks)[None].expand(n, e, -1)], dim=-1)
        v = valid.reshape(n, e).to(dev)
        lengths = v.sum(1)  # [N]
        has = lengths > 0
        length = int(lengths.max()) if n > 0 else 0
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
        if length == 0:  # no valid event anywhere (or an empty batch)
            nan = torch.full((n,), float("nan"), dtype=dtype, device=dev)
            minus = torch.full((n,), -1, dtype=torch.long, device=dev)
            tok_nan = torch.full((n, t), float("nan"), dtype=dtype, device=dev)
            return FlowValidatorOutput(
                nan, nan.clone(), neg_inf.expand(n, b, t).clone(), minus, minus.clone(), has, tok_nan, tok_nan.clone()
            )

        # Compact: valid events first, in depth-major order (stable sort of ~valid).
        order = torch.sort((~v).to(torch.int8), dim=1, stable=True).indices[:, :length]  # [N, L]
        keep = torch.arange(length, device=dev)[None, :] < lengths[:, None]  # [N, L]
        xc = x.gather(1, order[..., None].expand(n, length, x.shape[-1]))
        xc = xc.masked_fill(~keep[..., None], 0.0)

        if cfg.event_layernorm:
            xc = torch.cat([self.input_norm(xc[..., :f]), xc[..., f:]], dim=-1)
        h = self.embed_norm(self.mlp(xc))  # [N, L, embed]
        depth = None
        if cfg.head == "depth":
            depth = self._depth_pool(h, keep, order, valid.to(dev))
            pooled, attend = depth["logits"], None
        elif cfg.head == "gru":
            # Packed: the GRU runs over each row's valid events only (cost ~ total events, not
            # rows x longest row); trailing padding could not reach valid events anyway (causal).
            packed = nn.utils.rnn.pack_padded_sequence(
                h, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False
            )
            seq, _ = nn.utils.rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=length)
            ev = self.head(seq).squeeze(-1).masked_fill(~keep, float("-inf"))  # [N, L]
            pooled = ev.max(dim=1).values if cfg.pooling == "max" else torch.logsumexp(ev, dim=1)
            attend = None
        else:
            ev = self.head(h).squeeze(-1).masked_fill(~keep, float("-inf"))  # [N, L]
            attend = self.attend(h).squeeze(-1).masked_fill(~keep, float("-inf"))
            att = torch.softmax(attend, dim=1)
            pooled = (att * ev.masked_fill(~keep, 0.0)).sum(1)
        state_term = torch.zeros_like(pooled)
        if states is not None:
            sel = states[:, list(cfg.state_blocks)].to(dev, dtype)
            z = ((sel - self.state_shift) / self.state_scale).reshape(n, -1)
            state_term = self.state_head(self.state_dropout(z)).squeeze(-1)
            pooled = pooled + state_term
        logits = torch.where(has, pooled, torch.full_like(pooled, float("nan")))
        scores = torch.sigmoid(logits)

        if depth is not None:
            full = depth["event_logits"]
            culprit_block, culprit_column = culprit_cells(depth["culprit"], has, t)
            token_logits = depth["token_logits"]
            token_weights = torch.zeros_like(token_logits).scatter(1, culprit_column.clamp_min(0)[:, None], 1.0)
            token_weights = token_weights * has[:, None]
        else:
            full = torch.full((n, e), float("-inf"), dtype=ev.dtype, device=dev).scatter(1, order, ev).reshape(n, b, t)
            if attend is not None:
                att_full = torch.full((n, e), float("-inf"), dtype=ev.dtype, device=dev).scatter(1, order, attend)
                token_logits, token_weights = token_pool_attention(full, att_full.reshape(n, b, t))
            else:
                token_logits, token_weights = token_pool_max(full, cfg.pooling)
            # The riskiest token, not the largest single event: the event lands on the wrong words less
            # often (benchmarks/culprit_quality.py).
            culprit_block, culprit_column = riskiest_token_cells(token_logits, full, has)
        return FlowValidatorOutput(
            logits=logits,
            scores=scores,
            event_logits=full,
            culprit_block=culprit_block,
            culprit_column=culprit_column,
            has_events=has,
            token_logits=token_logits + state_term[:, None],
            token_weights=token_weights,
        )

    def _ensemble_forward(
        self, values: torch.Tensor, valid: torch.Tensor, states: torch.Tensor | None
    ) -> FlowValidatorOutput:
        """Mean of the members' outputs; the culprit is the token with the largest mean token logit."""
        outs = [member(values, valid, states) for member in self.members]

        def mean(name: str) -> torch.Tensor:
            return torch.stack([getattr(o, name) for o in outs]).mean(0)

        # a cell or token without events stays -inf / nan
        logits, events, token_logits = mean("logits"), mean("event_logits"), mean("token_logits")
        has = outs[0].has_events
        culprit_block, culprit_column = riskiest_token_cells(token_logits, events, has)
        return FlowValidatorOutput(
            logits=logits,
            scores=torch.sigmoid(logits),
            event_logits=events,
            culprit_block=culprit_block,
            culprit_column=culprit_column,
            has_events=has,
            token_logits=token_logits,
            token_weights=mean("token_weights"),
        )

    def _block_logits(self, emb: torch.Tensor, event_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The depth head's per-block logits.

        Args:
            emb: ``[N, B, T, E]`` event embeddings (zero where ``mask`` is false).
            event_logits: ``[N, B, T]`` event logits.
            mask: ``[N, B, T]`` bool, the valid events.

        Returns:
            ``[N, B]`` block logits, ``nan`` for a block without events.
        """
        count = mask.sum(2)  # [N, B]
        present = count > 0
        mean = emb.sum(2) / count.clamp_min(1)[..., None].to(emb.dtype)
        top = emb.masked_fill(~mask[..., None], float("-inf")).amax(2)
        top_logit = event_logits.masked_fill(~mask, float("-inf")).amax(2)
        summary = torch.cat([mean, top, top_logit[..., None]], dim=-1)
        summary = summary.masked_fill(~present[..., None], 0.0)  # an absent block is a zero input to the conv
        z = nn.functional.gelu(self.depth_conv(summary.transpose(1, 2))).transpose(1, 2)  # [N, B, E]
        out = self.depth_out(self.depth_dropout(z)).squeeze(-1)
        return out.masked_fill(~present, float("nan"))

    def _depth_pool(
        self, h: torch.Tensor, keep: torch.Tensor, order: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Depth-summary pooling of compacted event embeddings.

        Args:
            h: ``[N, L, E]`` embeddings of the compacted events (``order`` maps them to ``B*T`` cells).
            keep: ``[N, L]`` bool, the real (non-padding) compacted events.
            order: ``[N, L]`` long, the flat ``b*T + t`` cell of each compacted event.
            valid: ``[N, B, T]`` bool.

        Returns:
            ``logits`` ``[N]`` (mean block logit), ``event_logits`` ``[N, B, T]``, ``culprit`` ``[N]``
            (flat cell: the block with the largest logit, in it the token with the largest event
            logit) and ``token_logits`` ``[N, T]`` (the answer's logit had it only this token's events).
        """
        n, b, t = valid.shape
        # Back to the [N, B, T] grid; cells that are not events stay zero (padding writes zeros).
        emb = torch.zeros(n, b * t, h.shape[-1], dtype=h.dtype, device=h.device)
        emb = emb.scatter(1, order[..., None].expand_as(h), h.masked_fill(~keep[..., None], 0.0)).reshape(n, b, t, -1)
        ev = self.head(emb).squeeze(-1).masked_fill(~valid, float("-inf"))  # [N, B, T]
        blocks = self._block_logits(emb, ev, valid)  # [N, B]
        logits = mean_present(blocks)
        best_block = blocks.nan_to_num(float("-inf")).argmax(1)  # [N]
        column = ev.gather(1, best_block[:, None, None].expand(n, 1, t)).squeeze(1).argmax(1)
        # One token alone: its mean and max over tokens are its own embedding.
        per_token = self._block_logits(
            emb.transpose(1, 2).reshape(n * t, b, 1, -1),
            ev.transpose(1, 2).reshape(n * t, b, 1),
            valid.transpose(1, 2).reshape(n * t, b, 1),
        )
        token_logits = mean_present(per_token.reshape(n, t, b))
        return {
            "logits": logits,
            "event_logits": ev,
            "culprit": best_block * t + column,
            "token_logits": token_logits,
        }

    def check_source(self, source: Any) -> None:
        """Refuse features of another model or flow recipe than this validator's (``None``: unknown, allowed)."""
        if source is None:
            return
        same = self.flow_config is None or source.flow_config == self.flow_config  # the usual case, every check
        if not same and not self.flow_config.same_features(source.flow_config):
            mine, theirs = self.flow_config.to_dict(), source.flow_config.to_dict()
            diff = sorted(
                k for k in mine if k not in ("hf_flowcheck_version", "basis_solver") and mine[k] != theirs.get(k)
            )
            raise ValueError(
                f"These features were computed with another FlowConfig than this validator was trained on "
                f"({', '.join(f'{k}: {theirs.get(k)!r} vs {mine[k]!r}' for k in diff)}); extract them with "
                "FlowExtractor(model, validator.flow_config)."
            )
        source.check_model(self.base_fingerprint, "These features")

    @torch.no_grad()
    def score_features(self, features: FlowFeatures, *, batch_size: int = 256) -> FlowValidatorOutput:
        """Score a :class:`~hf_flowcheck.extraction.FlowFeatures` batch in eval mode.

        Args:
            features: ``values [N, B, T, F]``, ``valid [N, B, T]``, ``positions [N, T]``.
            batch_size: Samples per forward pass (bounds memory; results do not depend on it).

        Returns:
            :class:`FlowValidatorOutput` on the validator's device, with ``culprit_position``
            ``[N]`` (sequence index ``t0`` of the culprit, -1 for rows without events).

        Raises:
            ValueError: If the feature names differ from those the validator was trained on, or the
                features were computed with another flow recipe (``features.source``).
            FingerprintMismatchError: The features came from another model than the validator's.
        """
        if not isinstance(features, FlowFeatures):
            raise ValueError(
                f"score_features() takes FlowFeatures (from FlowExtractor), got {type(features).__name__}; "
                "call the validator directly for raw (values, valid) tensors."
            )
        self.check_feature_names(features.names)
        self.check_source(features.source)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            st = features.states
            outs = [
                self(
                    features.values[i : i + batch_size].to(dev),
                    features.valid[i : i + batch_size].to(dev),
                    None if st is None else st[i : i + batch_size].to(dev),
                )
                for i in range(0, max(len(features), 1), batch_size)
            ]
        finally:
            self.train(was_training)
        out = FlowValidatorOutput(
            *(torch.cat([getattr(o, f.name) for o in outs]) for f in fields(FlowValidatorOutput)[:8])
        )
        if features.word_tokens is not None:
            out.culprit_block, out.culprit_column = word_token_cells(out, features.word_tokens)
        pos = features.positions.to(dev)
        col = out.culprit_column.clamp_min(0)
        picked = pos.gather(1, col[:, None]).squeeze(1) if pos.shape[1] > 0 else torch.full_like(col, -1)
        out.culprit_position = torch.where(out.has_events, picked, torch.full_like(picked, -1))
        return out

    # -------------------------------------------------------------------------- compatibility
    def check_feature_names(self, names: tuple[str, ...] | list[str]) -> None:
        """Raise a ``ValueError`` when ``names`` differ from the names the validator was trained on."""
        expected = self.config.feature_names
        if expected and tuple(names) != tuple(expected):
            raise ValueError(
                f"The features are {list(names)} but this validator was trained on {list(expected)}; "
                f"extract them with the validator's flow_config (validator.flow_config = {self.flow_config})."
            )

    def check_compatible(self, model: nn.Module, *, fields: tuple[str, ...] = CHECKED_FIELDS) -> None:
        """Raise unless ``model`` is the base model this validator was trained on.

        Args:
            model: A transformers causal LM.
            fields: Fingerprint fields to compare (default: architecture, sizes and readout hash).

        Raises:
            FingerprintMismatchError: Naming each differing field with both values.
            ValueError: If this validator carries no fingerprint.
        """
        if not self.base_fingerprint:
            raise ValueError(
                "This validator has no base-model fingerprint, so compatibility cannot be checked (pass "
                "check_compatibility=False to FlowCheckedModelForCausalLM to use it unchecked). When you "
                "know which model its features came from, set "
                "validator.base_fingerprint = hf_flowcheck.fingerprint.model_fingerprint(model) before saving "
                "(train_validator(..., base_model=model) does this)."
            )
        check_fingerprint(self.base_fingerprint, model, fields=fields, what="validator")

    def recommended_threshold(
        self, operating_point: str = "precision_0.8", *, prompt_style: str | None = None
    ) -> float:
        """The score threshold chosen on the validation split for ``operating_point``.

        ``"precision_0.8"`` / ``"precision_0.9"`` flag answers with validation precision >= 0.8 / 0.9;
        ``"risk_0.1"`` / ``"risk_0.2"`` keep answers below it at a validation risk <= 0.1 / 0.2
        (``flowcheck train`` stores them; older validators only the first and third).

        Args:
            operating_point: Which point.
            prompt_style: The point chosen on validation answers of this prompt style only (validators
                trained on the corpus carry one set per style, ``training_metadata["operating_points_by_group"]``).

        Raises:
            ValueError: The validator carries no such operating point (older or hand-trained validators),
                or none for that prompt style.
        """
        points = self.training_metadata.get("operating_points") or {}
        where = "on validation"
        if prompt_style is not None:
            groups = self.training_metadata.get("operating_points_by_group") or {}
            if prompt_style not in groups:
                raise ValueError(
                    f"This validator has no operating points for prompt_style={prompt_style!r} (it has "
                    f"{sorted(groups) or 'none'}); leave prompt_style out for the points of its whole validation split."
                )
            points, where = groups[prompt_style], f"on validation answers of style {prompt_style!r}"
        point = points.get(operating_point)
        if not point or point.get("threshold") is None:
            known = sorted(k for k, v in points.items() if isinstance(v, dict) and v.get("threshold") is not None)
            raise ValueError(
                f"This validator has no {operating_point!r} threshold chosen {where} (it has {known or 'none'}); "
                "pass a number, or retrain it with `flowcheck train`, which stores them."
            )
        return float(point["threshold"])

    def set_base_model(self, model: nn.Module, base_id: str | None = None, revision: str | None = None) -> None:
        """Record ``model``'s fingerprint (see :func:`hf_flowcheck.fingerprint.model_fingerprint`)."""
        self.base_fingerprint = model_fingerprint(model, base_id=base_id, revision=revision)

    def record_evaluation(self, results: Any, *, command: str | None = None, **extra: Any) -> None:
        """Store evaluation results (and the command that produced them) for config.json and the model card.

        Args:
            results: One :func:`~hf_flowcheck.metrics.evaluate_scores` result, a list of them,
                or ``{row_name: result}``.
            command: The command line that produced the results.
            **extra: More JSON-serialisable facts (protocol, split, dataset ...).
        """
        from hf_flowcheck.metrics import format_table

        format_table(results)  # validates the structure early, with its own clear error
        self.training_metadata["evaluation"] = jsonable(results, "evaluation")
        if command is not None:
            self.training_metadata["command"] = str(command)
        self.training_metadata.update(jsonable(extra, "training_metadata"))

    def record_later_evaluation(self, title: str, results: Any, *, command: str, note: str = "") -> None:
        """Add an evaluation made after training (e.g. on answers collected since) to the model card.

        The training-time evaluation (:meth:`record_evaluation`) stays as it was; each later one gets its
        own card section with its table, note and command.

        Args:
            title: Section title, e.g. ``"Held out: the test split plus 910 newer answers"``.
            results: :func:`~hf_flowcheck.metrics.evaluate_scores` results (as for :meth:`record_evaluation`).
            command: The command line that produced them.
            note: What the rows are, in a sentence or two.
        """
        from hf_flowcheck.metrics import format_table

        format_table(results)
        entry = {"title": str(title), "evaluation": jsonable(results, "evaluation"), "command": str(command)}
        if note:
            entry["note"] = str(note)
        later = [e for e in self.training_metadata.get("later_evaluations", []) if e.get("title") != entry["title"]]
        self.training_metadata["later_evaluations"] = [*later, entry]

    # ----------------------------------------------------------------------------------- I/O

    def model_card_text(self, repo_id: str | None = None) -> str:
        """Markdown of the model card (works offline)."""
        return model_card_text(self, repo_id)

    def config_dict(self) -> dict[str, Any]:
        """The validator's own ``config.json`` entries (``SavedDetectorMixin`` adds the stamps)."""
        return {
            "validator_config": self.config.to_dict(),
            "flow_config": self.flow_config.to_dict() if self.flow_config is not None else None,
            "base_fingerprint": jsonable(self.base_fingerprint, "base_fingerprint"),
            "training_metadata": jsonable(self.training_metadata, "training_metadata"),
        }

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> FlowValidator:
        keys = ("validator_config", "flow_config", "base_fingerprint", "training_metadata")
        kwargs = {k: config.get(k) for k in keys}
        kwargs.update({k: v for k, v in model_kwargs.items() if k in kwargs})
        return cls(**kwargs)

    def load_state_tensors(self, path: str, *, map_location: str = "cpu", strict: bool = True) -> None:
        self.load_weights_file(path, map_location=map_location, strict=strict)

    def load_weights_file(self, path: str | Path, *, map_location: str = "cpu", strict: bool = True) -> None:
        """Load ``model.safetensors`` strictly, with errors that say what is wrong.

        Raises:
            CheckpointError: Unreadable (corrupted/truncated) file, missing or unexpected keys,
                shape mismatches, or non-finite weights.
        """
        own = self.state_dict()
        # Format-1 files predate the (then unused) input-scaling buffers; files saved before the
        # calibration have no logit map (the identity).
        names = ("feature_shift", "feature_scale") if self.config.input_transform == "none" else ()
        defaults = {k: own[k] for k in own if k in names or k.endswith("logit_calibration")}
        load_safetensors_strict(
            self,
            path,
            map_location=map_location,
            strict=strict,
            what="validator",
            error=CheckpointError,
            defaults=defaults,
        )
