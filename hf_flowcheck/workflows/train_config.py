"""`TrainConfig`: the recipe of ``flowcheck train`` / :func:`~hf_flowcheck.workflows.experiments.train_from_store`.

One owner for every training option's default, bound and help text: the CLI builds its flags from
these fields, and the trained validator records the config it was trained with
(``training_metadata["train_config"]``), so a run can be repeated from its folder.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hf_flowcheck.configuration import VersionedConfig, check_positive_int
from hf_flowcheck.detectors.flow_validator.config import HEADS, INPUT_TRANSFORMS, POOLINGS, ValidatorConfig
from hf_flowcheck.workflows.token_labels import TOKEN_LABEL_RULES

__all__ = ["SELECTIONS", "STATE_INITS", "TrainConfig"]

#: What picks the kept epoch.
SELECTIONS: tuple[str, ...] = ("val_loss", "val_auroc")
#: How a flow + state validator's state branch starts.
STATE_INITS: tuple[str, ...] = ("random", "probe", "frozen-probe")


def _validator_default(name: str) -> Any:
    """The default of a :class:`ValidatorConfig` field (the validator's shape has one owner)."""
    return next(f for f in dataclasses.fields(ValidatorConfig) if f.name == name).default


def _help(name: str, extra: str = "") -> dict[str, str]:
    base = next(f for f in dataclasses.fields(ValidatorConfig) if f.name == name).metadata["help"]
    return {"help": base + extra}


@dataclass(frozen=True)
class TrainConfig(VersionedConfig):
    """How a validator is trained on a feature store (everything but where the data and output live).

    Example:
        >>> TrainConfig(head="attention", epochs=20).to_dict()["epochs"]
        20
    """

    FORMAT_VERSION: ClassVar[int] = 1

    split_seed: int = field(default=0, metadata={"help": "Seed of the grouped 70/10/20 train/validation/test split."})
    epochs: int = field(default=30, metadata={"help": "Most epochs to train."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    batch_size: int = field(default=32, metadata={"help": "Answers per optimisation step."})
    patience: int = field(default=10, metadata={"help": "Epochs without improvement of --selection before stopping."})
    selection: str = field(
        default="val_loss", metadata={"help": "What picks the kept epoch (validation only).", "choices": SELECTIONS}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation and the batch order."})
    head: str = field(
        default=_validator_default("head"),
        metadata={**_help("head", " The bundled validators use 'attention'."), "choices": HEADS},
    )
    members: int = field(
        default=1, metadata={"help": "An ensemble of this many independently initialised validators (mean logit)."}
    )
    pooling: str = field(default=_validator_default("pooling"), metadata={**_help("pooling"), "choices": POOLINGS})
    input_transform: str = field(
        default=_validator_default("input_transform"),
        metadata={**_help("input_transform"), "choices": INPUT_TRANSFORMS},
    )
    event_layernorm: bool = field(default=_validator_default("event_layernorm"), metadata=_help("event_layernorm"))
    block_embedding: int = field(default=0, metadata={"help": "Size of the block-index embedding (0 = off)."})
    state: bool = field(
        default=False,
        metadata={
            "help": "Flow + state: also read the store's state summaries (the residual at the boundary a "
            "hidden-state probe picks on validation, or the token confidence)."
        },
    )
    state_spread: int = field(
        default=0,
        metadata={"help": "With state: also read the boundaries this many blocks below and above the probe's."},
    )
    state_init: str = field(
        default="random",
        metadata={
            "help": "With state: start the state branch at the hidden-state probe ('probe'), or keep it there and "
            "train the flow part as a residual on top ('frozen-probe').",
            "choices": STATE_INITS,
        },
    )
    prefix_augment: float = field(
        default=0.0,
        metadata={
            "help": "Probability of cutting a training answer to a random prefix (0-1): running scores that mean "
            "something before the answer ends. Not with state."
        },
    )
    token_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a token-level loss on weak labels from the reference answers (a replayed store; "
            "needs the model's tokenizer). 0: off."
        },
    )
    token_label_rule: str = field(
        default="references",
        metadata={
            "help": "With token_loss_weight: which answer words count as supported. 'references': words of a "
            "reference answer; 'references+question': also the question's words, and function words left "
            "unlabelled (more precise on a hand-checked sample, docs/results.md).",
            "choices": TOKEN_LABEL_RULES,
        },
    )
    channels: tuple[str, ...] | None = field(
        default=None, metadata={"help": "Keep only these feature channels.", "nargs": "+"}
    )
    hidden: int = field(default=_validator_default("hidden"), metadata=_help("hidden"))
    embed: int = field(default=_validator_default("embed"), metadata=_help("embed"))
    gru_hidden: int = field(default=_validator_default("gru_hidden"), metadata=_help("gru_hidden"))
    dropout: float = field(default=_validator_default("dropout"), metadata=_help("dropout"))
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay."})
    grad_clip: float | None = field(
        default=1.0, metadata={"help": "Largest gradient norm (clipped above it); None: no clipping."}
    )
    state_l2: float = field(
        default=1e-2, metadata={"help": "With state_init 'probe'/'frozen-probe': the L2 penalty of the starting probe."}
    )
    n_bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples of the test intervals."})
    device: str | None = field(
        default=None,
        metadata={"help": "Where the validator trains (e.g. 'cuda'); None: the device of the train features."},
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "members", "n_bootstrap", "hidden", "embed", "gru_hidden"):
            check_positive_int(name, getattr(self, name), "TrainConfig", at_most=1 << 20)
        for name in ("split_seed", "seed", "block_embedding", "state_spread"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name}={value!r} must be a non-negative integer.")
        self._check_choices("TrainConfig")
        if type(self.device).__name__ == "device":  # a torch.device: kept as its name (the config stays JSON-able)
            object.__setattr__(self, "device", str(self.device))
        if self.device is not None and (not isinstance(self.device, str) or not self.device):
            raise ValueError(f"TrainConfig.device={self.device!r} must be a device name such as 'cuda' or None.")
        for name in ("event_layernorm", "state"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be True or False.")
        checks = (
            ("lr", lambda v: v > 0, "a positive number"),
            ("weight_decay", lambda v: v >= 0, "0 or more"),
            ("state_l2", lambda v: v >= 0, "0 or more"),
            ("token_loss_weight", lambda v: v >= 0, "0 or more"),
            ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
            ("prefix_augment", lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
        )
        for name, ok, what in checks:
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not ok(value):
                raise ValueError(f"TrainConfig.{name}={value!r} must be {what}.")
        clip = self.grad_clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
            raise ValueError(f"TrainConfig.grad_clip={clip!r} must be a positive number or None (no clipping).")
        if self.channels is not None:
            if isinstance(self.channels, str) or not all(isinstance(c, str) for c in self.channels):
                raise ValueError(f"TrainConfig.channels={self.channels!r} must be a list of channel names.")
            object.__setattr__(self, "channels", tuple(self.channels))
        if self.state and self.prefix_augment:
            raise ValueError("TrainConfig: prefix_augment trains a streaming validator; it does not go with state.")
