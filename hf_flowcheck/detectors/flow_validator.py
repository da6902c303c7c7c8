"""The flow validator (spec ``flow-signatures.md`` §6, paper B.9): events in, one sample score out.

Three heads share the event encoder. ``head="gru"`` is the spec's B.9, described below.
``head="attention"`` scores each event on its own and takes the attention-weighted mean of the
event logits as the sample logit (every event gets gradient; the culprit is the event with the
largest logit). ``head="depth"`` is a depth-summary model: per block, the mean and maximum of the
event embeddings over the answer's tokens and the largest event logit, a 1-D convolution over depth,
one logit per block, their mean as the sample logit (the culprit is the block with the largest logit
and, in it, the token with the largest event logit). Every head can read its inputs scaled per
(block, feature), a block embedding, the readout-lens channels and, in a *flow + state* validator,
the residual state at the last answer token (:class:`ValidatorConfig`).

Events are the valid ``(b, t)`` cells of a :class:`~hf_flowcheck.extraction.FlowFeatures` tensor,
read depth-major (every masked token of block 0, then block 1, ...). Each event's feature vector
goes through ``LayerNorm(F) → MLP (F→256→128, GELU, dropout) → LayerNorm → GRU(128→256) →
Linear(256→1)``; the per-event logits are pooled over the valid events (``max`` by default, or
``logsumexp``) into the sample logit. ``sigmoid(logit)`` is the score: **in [0, 1], higher = more
likely hallucinated**. The arg-max event is the *culprit* ``(t0, b0)`` that refinement patches.

Padding never reaches the GRU: the valid events of each row are compacted to the front (a stable
sort keeps their depth-major order) before the recurrence, and the per-event logits are scattered
back to ``[N, B, T]`` afterwards. A row's score therefore does not depend on the other rows of the
batch nor on how many padding columns ``T`` carries.

Saved with :meth:`FlowValidator.save_pretrained` / :meth:`~FlowValidator.push_to_hub`
(``huggingface_hub.PyTorchModelHubMixin``) as ``config.json`` (the :class:`ValidatorConfig`, the
``FlowConfig`` the features were computed with, the base-model fingerprint, version stamps and
training metadata), ``model.safetensors`` (loaded strictly) and a generated ``README.md``.

Example:
    >>> import torch
    >>> v = FlowValidator(ValidatorConfig(num_features=10, hidden=16, embed=8, gru_hidden=8))
    >>> values, valid = torch.randn(2, 4, 3, 10), torch.ones(2, 4, 3, dtype=torch.bool)
    >>> out = v.eval()(values, valid)
    >>> tuple(out.scores.shape), tuple(out.event_logits.shape)
    ((2,), (2, 4, 3))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from hf_flowcheck.configuration import FlowConfig, check_positive_int, versioned_fields
from hf_flowcheck.detectors.checkpoint import (
    CheckpointError,
    SavedDetectorMixin,
    jsonable,
    load_safetensors_strict,
)
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.fingerprint import CHECKED_FIELDS, check_fingerprint, model_fingerprint
from hf_flowcheck.version import __version__

__all__ = ["CheckpointError", "FlowValidator", "FlowValidatorOutput", "ValidatorConfig"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
POOLINGS: tuple[str, ...] = ("max", "logsumexp")
INPUT_TRANSFORMS: tuple[str, ...] = ("block_log_standardize", "log_standardize", "standardize", "none")
HEADS: tuple[str, ...] = ("attention", "gru", "depth")


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


#: Upper bounds of the size fields (checked before any allocation; far above any trained validator).
SIZE_BOUNDS: dict[str, int] = {
    "num_features": 256,
    "hidden": 4096,
    "embed": 4096,
    "gru_hidden": 4096,
    "members": 64,
    "num_blocks": 1024,
    "block_embedding": 1024,
    "state_dim": 65536,
}


@dataclass
class ValidatorConfig:
    """Shape of the flow validator (paper B.9 defaults).

    Example:
        >>> ValidatorConfig(num_features=10).pooling
        'max'
    """

    #: 2 added ``input_transform`` and ``event_layernorm``; format-1 files load as the spec's plain B.9.
    #: 3 added ``head``, ``num_blocks``, ``block_embedding`` and the state branch; format-2 files load as GRUs.
    #: 4 added ``members``; format-3 files load as one member.
    FORMAT_VERSION: ClassVar[int] = 4

    num_features: int = field(metadata={"help": "F, the number of feature channels per event (10 'full', 8 'paper')."})
    hidden: int = field(default=256, metadata={"help": "Width of the MLP's hidden layer (F→hidden→embed)."})
    embed: int = field(default=128, metadata={"help": "Event embedding size, the GRU's input size."})
    gru_hidden: int = field(default=256, metadata={"help": "GRU hidden size (one layer)."})
    dropout: float = field(default=0.1, metadata={"help": "Dropout probability inside the MLP, in [0, 1)."})
    pooling: str = field(
        default="max",
        metadata={"help": "Pooling of event logits into the sample logit: 'max' (default) or 'logsumexp'."},
    )
    input_transform: str = field(
        default="log_standardize",
        metadata={
            "help": "Per-feature input scaling before the spec's LayerNorm(F): 'log_standardize' (log1p, then "
            "train-split mean/std; default), 'standardize' (mean/std only) or 'none' (the spec's B.9 exactly). "
            "The features span three orders of magnitude (mlp_mag ~10-100, ratios ~0.1), and a LayerNorm across "
            "one event's features lets the large ones drown the small ones."
        },
    )
    event_layernorm: bool = field(
        default=True,
        metadata={
            "help": "Apply the spec's LayerNorm across each event's F features (B.9). It also removes each "
            "event's common magnitude (all features large or small together); with a per-feature "
            "input_transform, False keeps that information."
        },
    )
    feature_names: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Names of the F feature channels in order (FlowFeatures.names); checked when scoring "
            "FlowFeatures. Empty = unchecked."
        },
    )
    head: str = field(
        default="gru",
        metadata={
            "help": "'gru' (the spec's B.9: a GRU over the depth-major events, then max/logsumexp pooling) or "
            "'attention' (each event scored on its own, the sample logit an attention-weighted mean of the "
            "event logits: every event gets gradient, and the culprit is the event with the largest logit) or "
            "'depth' (a depth-summary model: per block, the mean and max over tokens of the event embeddings and "
            "the largest event logit, a 1-D convolution over depth (kernel 3), one logit per block, their mean; "
            "the culprit is the block with the largest logit and, in it, the token with the largest event logit)."
        },
    )
    num_blocks: int = field(
        default=0,
        metadata={
            "help": "B, the base model's blocks; needed by block_log_standardize and block_embedding (0 = unset)."
        },
    )
    block_embedding: int = field(
        default=0,
        metadata={"help": "Size of a learned embedding of the event's block index added to its input (0 = off)."},
    )
    state_dim: int = field(
        default=0,
        metadata={
            "help": "d of the residual-state summaries (FlowFeatures.states) a flow + state validator reads; "
            "0 = flow only."
        },
    )
    state_blocks: tuple[int, ...] = field(
        default=(),
        metadata={"help": "Which of the B+1 residual boundaries the state branch reads (indices into states)."},
    )
    members: int = field(
        default=1,
        metadata={
            "help": "An ensemble of this many independently initialised validators of this shape, trained together; "
            "the answer's logit, the event and token logits are their means, and the culprit is the event with the "
            "largest mean logit. 1 = a single validator."
        },
    )

    def __post_init__(self) -> None:
        for name, bound in SIZE_BOUNDS.items():
            if name in ("num_blocks", "block_embedding", "state_dim"):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bound:
                    raise ValueError(f"ValidatorConfig.{name}={value!r} must be an integer in [0, {bound}].")
            else:
                check_positive_int(name, getattr(self, name), "ValidatorConfig", at_most=bound)
        if self.head not in HEADS:
            raise ValueError(
                f"ValidatorConfig.head={self.head!r} is not supported; use one of {', '.join(map(repr, HEADS))}."
            )
        needs_blocks = self.input_transform == "block_log_standardize" or self.block_embedding > 0
        if needs_blocks and self.num_blocks < 1:
            raise ValueError(
                "ValidatorConfig.num_blocks must be set (the base model's block count, FlowFeatures.num_blocks) "
                "for input_transform='block_log_standardize' or block_embedding > 0."
            )
        self.state_blocks = tuple(int(b) for b in self.state_blocks)
        if bool(self.state_dim) != bool(self.state_blocks):
            raise ValueError(
                f"ValidatorConfig.state_dim={self.state_dim} and state_blocks={self.state_blocks} must be set together "
                "(both for a flow + state validator, neither for flow only)."
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"ValidatorConfig.dropout={self.dropout!r} must be a number in [0, 1).")
        self.dropout = float(self.dropout)
        if self.pooling not in POOLINGS:
            raise ValueError(
                f"ValidatorConfig.pooling={self.pooling!r} is not supported; "
                f"use one of {', '.join(map(repr, POOLINGS))}."
            )
        if self.input_transform not in INPUT_TRANSFORMS:
            raise ValueError(
                f"ValidatorConfig.input_transform={self.input_transform!r} is not supported; "
                f"use one of {', '.join(map(repr, INPUT_TRANSFORMS))}."
            )
        if isinstance(self.feature_names, str) or not all(isinstance(n, str) for n in self.feature_names):
            raise ValueError(
                f"ValidatorConfig.feature_names={self.feature_names!r} must be a sequence of strings "
                "(e.g. FlowFeatures.names)."
            )
        self.feature_names = tuple(self.feature_names)
        if self.feature_names and len(self.feature_names) != self.num_features:
            raise ValueError(
                f"ValidatorConfig.feature_names has {len(self.feature_names)} names but num_features="
                f"{self.num_features}; pass one name per feature channel, or no names."
            )

    @classmethod
    def from_feature_names(cls, names: tuple[str, ...] | list[str], **kwargs: Any) -> ValidatorConfig:
        """Config for features with these channel names (``num_features = len(names)``)."""
        return cls(num_features=len(names), feature_names=tuple(names), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with version stamps, suitable for ``json.dumps``."""
        out = dataclasses.asdict(self)
        out["feature_names"] = list(self.feature_names)
        out["state_blocks"] = list(self.state_blocks)
        out["format_version"] = self.FORMAT_VERSION
        out["hf_flowcheck_version"] = __version__
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidatorConfig:
        """Inverse of :meth:`to_dict`; unknown keys and newer format versions are refused."""
        if isinstance(data, cls):
            return data
        if isinstance(data, dict) and data.get("format_version", cls.FORMAT_VERSION) < 2:
            data = {"input_transform": "none", "event_layernorm": True, **data}
        if isinstance(data, dict) and data.get("format_version", cls.FORMAT_VERSION) < 3:
            data = {"head": "gru", **data}
        return cls(**versioned_fields(cls, data, cls.FORMAT_VERSION))


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


@dataclass
class FlowValidatorOutput:
    """What the validator returns for ``N`` samples.

    Attributes:
        logits: ``[N]`` pooled sample logits; ``nan`` for rows without any valid event.
        scores: ``[N]`` ``sigmoid(logits)`` in ``[0, 1]``, higher = more likely hallucinated;
            ``nan`` for rows without events.
        event_logits: ``[N, B, T]`` per-event logits, ``-inf`` where the cell is not a valid event.
        culprit_block: ``[N]`` long, block ``b0`` of the arg-max event (-1 without events).
        culprit_column: ``[N]`` long, column ``t`` (index into ``T``) of the arg-max event (-1 without events).
        has_events: ``[N]`` bool, whether the row has at least one valid event.
        token_logits: ``[N, T]`` each token's logit: the validator's pooling applied to that token's
            events alone (plus the state term), i.e. the answer's logit if all of its flow evidence
            were this token's; ``nan`` for a column without events. With the attention head the
            answer's logit is their ``token_weights``-weighted mean; with the GRU head and max
            (log-sum-exp) pooling it is their maximum (log-sum-exp, state term counted once).
        token_weights: ``[N, T]`` each token's share of the pooling (attention mass of its events; for
            max pooling 1 at the arg-max token), summing to 1 over a row with events.
        culprit_position: ``[N]`` long, sequence position ``t0`` of the culprit (from
            ``FlowFeatures.positions``; -1 without events). Set by :meth:`FlowValidator.score_features` only.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    event_logits: torch.Tensor
    culprit_block: torch.Tensor
    culprit_column: torch.Tensor
    has_events: torch.Tensor
    token_logits: torch.Tensor
    token_weights: torch.Tensor
    culprit_position: torch.Tensor | None = None


def _token_pool_attention(event_logits: torch.Tensor, attend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling restricted to each token's events.

    Args:
        event_logits: ``[N, B, T]`` (``-inf`` where no event).
        attend: ``[N, B, T]`` attention logits (``-inf`` where no event).

    Returns:
        ``(token_logits, token_weights)``, each ``[N, T]``: the within-token attention average of the
        event logits (``nan`` without events) and the token's share of the answer's attention.
    """
    has = torch.isfinite(event_logits)
    tok_lse = torch.logsumexp(attend, dim=1)  # [N, T], -inf for a token without events
    within = torch.exp(attend - tok_lse[:, None].masked_fill(~torch.isfinite(tok_lse[:, None]), 0.0))
    within = within.masked_fill(~has, 0.0)
    logits = (within * event_logits.masked_fill(~has, 0.0)).sum(1)
    logits = torch.where(has.any(1), logits, torch.full_like(logits, float("nan")))
    weights = torch.softmax(tok_lse, dim=1)  # a row without events gives nan
    return logits, torch.nan_to_num(weights, nan=0.0)


def _mean_present(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the non-``nan`` entries; ``nan`` where there are none.

    ``torch.nanmean`` would also do in the forward pass, but its backward through an all-``nan`` row
    divides by zero; here such rows get zero gradient.
    """
    present = ~torch.isnan(x)
    count = present.sum(-1)
    mean = x.nan_to_num(0.0).sum(-1) / count.clamp_min(1).to(x.dtype)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def _culprit_cells(flat: torch.Tensor, has: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, column)`` of each row's culprit from its flat ``b*T + t`` cell; ``-1`` for rows without events."""
    minus = torch.full_like(flat, -1)
    return torch.where(has, torch.div(flat, t, rounding_mode="floor"), minus), torch.where(has, flat % t, minus)


def _token_pool_max(event_logits: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Max (or log-sum-exp) pooling restricted to each token's events; see :func:`_token_pool_attention`."""
    has = event_logits.isfinite().any(1)  # [N, T]
    if pooling == "max":
        logits = event_logits.max(dim=1).values
        weights = torch.zeros_like(logits)
        if logits.shape[1] > 0:
            weights.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    else:
        logits = torch.logsumexp(event_logits, dim=1)
        weights = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
    weights = weights * has.any(1, keepdim=True)
    return torch.where(has, logits, torch.full_like(logits, float("nan"))), weights


# ---------------------------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------------------------


def _yaml_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML scalar


def _looks_like_hub_id(name: str | None) -> bool:
    if not name or name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name):
        return False
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(parts)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


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
            full, flat = depth["event_logits"], depth["culprit"]
        else:
            full = torch.full((n, e), float("-inf"), dtype=ev.dtype, device=dev).scatter(1, order, ev).reshape(n, b, t)
            flat = order.gather(1, ev.argmax(dim=1)[:, None]).squeeze(1)  # the arg-max event's cell, [N]
        culprit_block, culprit_column = _culprit_cells(flat, has, t)

        if depth is not None:
            token_logits = depth["token_logits"]
            token_weights = torch.zeros_like(token_logits).scatter(1, culprit_column.clamp_min(0)[:, None], 1.0)
            token_weights = token_weights * has[:, None]
        elif attend is not None:
            att_full = torch.full((n, e), float("-inf"), dtype=ev.dtype, device=dev).scatter(1, order, attend)
            token_logits, token_weights = _token_pool_attention(full, att_full.reshape(n, b, t))
        else:
            token_logits, token_weights = _token_pool_max(full, cfg.pooling)
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
        """Mean of the members' outputs; the culprit is the event with the largest mean logit."""
        outs = [member(values, valid, states) for member in self.members]

        def mean(name: str) -> torch.Tensor:
            return torch.stack([getattr(o, name) for o in outs]).mean(0)

        logits, events = mean("logits"), mean("event_logits")  # -inf (no event) stays -inf
        has = outs[0].has_events
        n, _, t = events.shape
        if events.numel():
            culprit_block, culprit_column = _culprit_cells(events.reshape(n, -1).argmax(1), has, t)
        else:  # no token columns: no culprit
            culprit_block = torch.full((n,), -1, dtype=torch.long, device=events.device)
            culprit_column = culprit_block.clone()
        return FlowValidatorOutput(
            logits=logits,
            scores=torch.sigmoid(logits),
            event_logits=events,
            culprit_block=culprit_block,
            culprit_column=culprit_column,
            has_events=has,
            token_logits=mean("token_logits"),
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
        logits = _mean_present(blocks)
        best_block = blocks.nan_to_num(float("-inf")).argmax(1)  # [N]
        column = ev.gather(1, best_block[:, None, None].expand(n, 1, t)).squeeze(1).argmax(1)
        # One token alone: its mean and max over tokens are its own embedding.
        per_token = self._block_logits(
            emb.transpose(1, 2).reshape(n * t, b, 1, -1),
            ev.transpose(1, 2).reshape(n * t, b, 1),
            valid.transpose(1, 2).reshape(n * t, b, 1),
        )
        token_logits = _mean_present(per_token.reshape(n, t, b))
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
        from hf_flowcheck.metrics import format_table

        fp = self.base_fingerprint or {}
        base_id = fp.get("base_id")
        meta = self.training_metadata
        tags = ["hf_flowcheck", "hallucination-detection", "flow-signatures", "pytorch_model_hub_mixin"]
        lines = ["---", "library_name: hf_flowcheck", "tags:"] + [f"- {t}" for t in tags]
        if _looks_like_hub_id(base_id):
            lines.append(f"base_model: {_yaml_str(base_id)}")
        lines += ["---", ""]
        title = f"Flow validator for {base_id}" if base_id else "Flow validator"
        lines += [
            f"# {title}",
            "",
            "A hallucination detector built with hf_flowcheck (`pip install hf-flowcheck`) from "
            "*flow signatures*: how the base model's residual stream moves between blocks, read through its "
            "own readout. `score` = `sigmoid(logit)` lies in [0, 1]; **higher = more likely hallucinated**. "
            "The culprit event (the arg-max per-event logit) names the token and block to refine.",
            "",
        ]
        styles, tasks = meta.get("prompt_styles"), meta.get("tasks")
        if styles or tasks:
            lines += ["## Trained on", ""]
            if styles:
                lines.append("Prompt styles: " + ", ".join(f"`{x}`" for x in styles) + ".")
            if tasks:
                lines.append("Tasks: " + ", ".join(f"`{x}`" for x in tasks) + ".")
            lines.append("")
        for section in meta.get("card_sections") or []:  # written by the training script, already markdown
            lines += [f"## {section['title']}", "", section["text"].rstrip(), ""]
        lines += ["## Base model", ""]
        if fp:
            lines += ["| field | value |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in fp.items()]
        else:
            lines.append("Not recorded (the validator carries no base-model fingerprint).")
        lines += ["", "## Features", ""]
        if self.flow_config is not None:
            fc = dataclasses.asdict(self.flow_config)
            lines.append("`FlowConfig(" + ", ".join(f"{k}={v!r}" for k, v in fc.items()) + ")`")
        else:
            lines.append("FlowConfig not recorded.")
        names = ", ".join(f"`{n}`" for n in self.config.feature_names) or "(unnamed)"
        lines += [
            "",
            f"{self.config.num_features} channels: {names}.",
            "",
            "## Architecture",
            "",
            self._architecture_text(),
            "",
            "## Evaluation",
            "",
        ]
        evaluation = meta.get("evaluation")
        if evaluation:
            lines += ["```text", format_table(evaluation), "```", ""]
            lines.append(
                "Each cell is `value [low, high]`, a 95% percentile bootstrap interval. Label 1 = hallucinated."
            )
        else:
            lines.append("No evaluation recorded.")
        for key in ("protocol", "dataset", "split"):
            if key in meta:
                lines.append(f"- {key}: `{meta[key]}`")
        for later in meta.get("later_evaluations") or []:
            lines += ["", f"### {later['title']}", ""]
            if later.get("note"):
                lines += [later["note"], ""]
            lines += ["```text", format_table(later["evaluation"]), "```", "", "```bash", later["command"], "```"]
        cal = meta.get("calibration") or {}
        if cal:
            lines += ["", "## Calibration", ""]
            if "skipped" in cal:
                lines.append(f"None: {cal['skipped']}.")
            else:
                lines.append(
                    f"Platt scaling on the {cal['chosen_on']} split ({cal['n']} answers, "
                    f"{cal['hallucinated_share']:.0%} hallucinated): `score = sigmoid({cal['scale']:.3f} * logit "
                    f"{cal['bias']:+.3f})`; expected calibration error {cal['ece_before']:.3f} before, "
                    f"{cal['ece_after']:.3f} after. A score is the hallucination rate of answers like these; "
                    "another mix of prompts or another base rate moves it (the ranking does not change)."
                )
        points = meta.get("operating_points") or {}
        rows = [(k, v) for k, v in points.items() if isinstance(v, dict)]
        if rows:
            lines += ["", "## Operating points (chosen on the validation split)", ""]
            lines += ["| operating point | threshold | validation figures |", "|---|---|---|"]
            for k, v in rows:
                figures = ", ".join(f"{n} {x:.3f}" for n, x in v.items() if n != "threshold")
                lines.append(f"| `{k}` | {v['threshold']:.4f} | {figures} |")
            missing = [k for k, v in points.items() if v is None]
            if missing:
                lines.append(f"\nNo threshold reaches {', '.join(f'`{k}`' for k in missing)} on validation.")
            lines.append(
                '\n`generate(..., flow_check_every=1, flow_abstain_threshold="recommended")` uses `precision_0.8`.'
            )
        by_group = meta.get("operating_points_by_group") or {}
        if by_group:
            lines += ["", "Chosen on the validation answers of each prompt style "
                      "(`validator.recommended_threshold(point, prompt_style=...)`):", ""]  # fmt: skip
            names = sorted({k for g in by_group.values() for k, v in g.items() if k != "n"})
            lines += ["| prompt style | answers | " + " | ".join(f"`{k}`" for k in names) + " |"]
            lines += ["|---|---|" + "---|" * len(names)]
            for g, pts in by_group.items():
                cells = [f"{pts[k]['threshold']:.3f}" if pts.get(k) else "none" for k in names]
                lines.append(f"| {g} | {pts['n']} | " + " | ".join(cells) + " |")
        lines += ["", "## Training", ""]
        hist = meta.get("history") or {}
        hyper = meta.get("hyperparameters") or {}
        if hyper:
            lines.append("Hyperparameters: " + ", ".join(f"`{k}={v}`" for k, v in hyper.items()) + ".")
        if hist:
            lines.append(
                f"Checkpoint chosen on the validation split ({hist.get('selection', 'val_auroc')}): epoch "
                f"{hist.get('best_epoch')}, validation loss {hist.get('best_val_loss')}, validation AUROC "
                f"{hist.get('best_val_auroc')}; {hist.get('epochs_run')} epochs run "
                f"({'early-stopped' if hist.get('stopped_early') else 'no early stop'})."
            )
        if not hyper and not hist:
            lines.append("Not recorded.")
        lines += ["", "## Reproduce", ""]
        cmd = meta.get("command")
        lines += ["```bash", cmd, "```"] if cmd else ["The producing command was not recorded."]
        lines += [
            "",
            "## Usage",
            "",
            "```python",
            "from hf_flowcheck import FlowExtractor, FlowConfig",
            "from hf_flowcheck.detectors import FlowValidator",
            "",
            f"validator = FlowValidator.from_pretrained({json.dumps(repo_id or '<this repo>')}, base_model=model)",
            "extractor = FlowExtractor(model, validator.flow_config)",
            "out = validator.score_features(extractor.extract(input_ids, attention_mask, response_mask))",
            "out.scores  # [N], higher = more likely hallucinated",
            "```",
            "",
            f"Written by hf_flowcheck {__version__} (format version {self.FORMAT_VERSION}).",
            "",
        ]
        return "\n".join(lines)

    def _architecture_text(self) -> str:
        c = self.config
        if self.members is not None:
            return (
                f"An ensemble of {c.members} validators of the same shape, initialised independently and trained "
                "together on their mean logit; the answer's, events' and tokens' logits are the members' means, and "
                "the culprit is the event with the largest mean logit. Each member: "
                + self.members[0]._architecture_text()
            )
        scaling = {
            "block_log_standardize": "signed log, then per-(block, feature) standardisation (train split)",
            "log_standardize": "signed log, then per-feature standardisation (train split)",
            "standardize": "per-feature standardisation (train split)",
            "none": "raw features",
        }[c.input_transform]
        parts = [scaling]
        if c.event_layernorm:
            parts.append(f"LayerNorm({c.num_features})")
        depth = f" + block embedding ({c.block_embedding})" if c.block_embedding else ""
        parts.append(f"MLP ({c.num_features}{depth}→{c.hidden}→{c.embed}, GELU, dropout {c.dropout}) → LayerNorm")
        if c.head == "gru":
            parts.append(
                f"GRU ({c.embed}→{c.gru_hidden}) over the events in depth-major order → Linear({c.gru_hidden}→1) per "
                f"event → `{c.pooling}` pooling"
            )
        elif c.head == "depth":
            parts.append(
                f"per event a logit Linear({c.embed}→1); per block the mean and max over tokens of the event "
                f"embeddings and the largest event logit → Conv1d over depth ({2 * c.embed + 1}→{c.embed}, kernel 3, "
                f"GELU) → Linear({c.embed}→1) per block; the sample logit is the mean block logit"
            )
        else:
            parts.append(
                f"per event: a logit Linear({c.embed}→1) and an attention score Linear({c.embed}→1); the sample "
                "logit is the attention-weighted mean of the event logits"
            )
        text = " → ".join(parts) + "."
        if c.state_dim:
            text += (
                f" Plus a state branch: the residual at the last answer token entering block(s) {list(c.state_blocks)} "
                f"(d = {c.state_dim}), standardised, → dropout → Linear → added to the sample logit. Trained on "
                "complete answers, whose last token is the answer's end: it scores finished answers. Running scores "
                "of a streaming check (where the last token so far is mid-answer) are outside what it was trained "
                "on; stream with a flow-only validator trained on answer prefixes."
            )
        return text

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
