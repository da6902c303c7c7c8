"""The flow validator's shape: :class:`ValidatorConfig`, its choices and size bounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from hf_flowcheck.configuration import VersionedConfig, check_positive_int

__all__ = ["HEADS", "INPUT_TRANSFORMS", "POOLINGS", "SIZE_BOUNDS", "ValidatorConfig"]

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
class ValidatorConfig(VersionedConfig):
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

    @classmethod
    def _upgrade(cls, kwargs: dict[str, Any], format_version: int) -> dict[str, Any]:
        if format_version < 2:  # format 1 was the spec's plain B.9
            kwargs = {"input_transform": "none", "event_layernorm": True, **kwargs}
        if format_version < 3:  # before the other heads
            kwargs = {"head": "gru", **kwargs}
        return kwargs
