"""The gradient detector's configuration (:class:`GradientConfig`), its class names and abstention patterns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from hf_flowcheck.configuration import VersionedConfig, check_positive_int

__all__ = ["ABSTENTION_PATTERNS", "CLASS_NAMES", "READERS", "GradientConfig", "parse_layers", "parse_sketch"]


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_CARD_NAME = "README.md"
CLASS_NAMES: tuple[str, ...] = ("correct", "hallucinated", "did_not_answer")
READERS: tuple[str, ...] = ("transformer", "logistic")

#: Default "did not answer" matcher (case-insensitive regular expressions, searched in the answer).
ABSTENTION_PATTERNS: tuple[str, ...] = (
    r"\bi (?:do not|don'?t) know\b",
    r"\bi(?: am|'m) not (?:sure|certain)\b",
    r"\bi(?: am|'m)? ?(?:unable|not able) to (?:answer|say|determine|tell)\b",
    r"\b(?:cannot|can'?t|could not|couldn'?t) (?:be )?(?:answer|say|determine|know|tell)",
    r"\bno (?:definite|definitive|clear|known|certain) answer\b",
    r"\b(?:not|no) (?:enough|sufficient) information\b",
    r"\b(?:unanswerable|unknowable)\b",
    r"\bnobody knows\b",
    r"\bit is (?:unknown|unclear)\b",
)


def parse_layers(text: str) -> int | list[int] | str:
    """Command-line form of :attr:`GradientConfig.layers`: ``5`` (last five), ``all``, or ``0,-1``."""
    text = text.strip()
    if text == "all":
        return text
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(
            f"{text!r} is not a block selection; pass an int n (the last n blocks), 'all', or indices like 0,-1."
        ) from None
    return values[0] if len(values) == 1 and "," not in text else values


def parse_sketch(text: str) -> int | None:
    """Command-line form of :attr:`GradientConfig.sketch`: rows ``k``, or ``exact`` (also ``0``) for none."""
    if text.strip().lower() in ("exact", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a sketch size; pass a positive int, or 'exact' (full gradients).") from None


@dataclass
class GradientConfig(VersionedConfig):
    """How gradient signatures are computed and read (defaults of ``gradient-signatures.md``).

    Example:
        >>> GradientConfig().select_blocks(30)
        [25, 26, 27, 28, 29]
        >>> GradientConfig(layers=[0, -1]).select_blocks(4)
        [0, 3]
    """

    FORMAT_VERSION: ClassVar[int] = 1

    layers: int | list[int] | str = field(
        default=5,
        metadata={
            "help": "Blocks whose gradients are taken: an int n (the last n blocks), a list of block indices "
            "(negative counts from the end), or 'all'.",
            "parse": parse_layers,
        },
    )
    sketch: int | None = field(
        default=32,
        metadata={
            "help": "Rows k of the Gaussian sketches P, Q of each linear weight's gradient (k*k numbers per "
            "linear); None = exact full weight gradients (small models only; 'exact' on the command line).",
            "parse": parse_sketch,
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sketches and of the reader's training."})
    classes: int = field(
        default=2,
        metadata={"help": "2 (correct / hallucinated) or 3 (+ did-not-answer, found by abstention_patterns)."},
    )
    reader: str = field(
        default="transformer",
        metadata={
            "help": "'transformer' (small encoder over the layer sequence) or 'logistic' (regression).",
            "choices": READERS,
        },
    )
    d_model: int = field(default=64, metadata={"help": "Transformer reader width."})
    reader_layers: int = field(default=2, metadata={"help": "Transformer reader encoder layers."})
    num_heads: int = field(default=4, metadata={"help": "Transformer reader attention heads (divides d_model)."})
    dropout: float = field(default=0.1, metadata={"help": "Transformer reader dropout, in [0, 1)."})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the reader."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay of the reader."})
    epochs: int = field(default=200, metadata={"help": "Maximum training epochs of the reader."})
    batch_size: int = field(default=64, metadata={"help": "Reader mini-batch size."})
    patience: int = field(
        default=30, metadata={"help": "Stop after this many epochs without a better validation score."}
    )
    abstention_patterns: tuple[str, ...] = field(
        default=ABSTENTION_PATTERNS,
        metadata={
            "help": "Case-insensitive regular expressions; an answer matching any is 'did not answer' "
            "(class 2) when classes=3.",
            "nargs": "+",
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            if self.layers != "all":
                raise ValueError(
                    f"GradientConfig.layers={self.layers!r} is not supported; use an int n (last n blocks), a list "
                    "of block indices, or 'all'."
                )
        elif isinstance(self.layers, int) and not isinstance(self.layers, bool):
            check_positive_int("layers", self.layers, "GradientConfig")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(
                    f"GradientConfig.layers={self.layers!r} must be a non-empty list of int block indices."
                )
            self.layers = [int(i) for i in self.layers]
        else:
            raise ValueError(f"GradientConfig.layers={self.layers!r} must be an int, a list of ints or 'all'.")
        if self.sketch is not None:
            check_positive_int("sketch", self.sketch, "GradientConfig")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"GradientConfig.seed={self.seed!r} must be an int.")
        if self.classes not in (2, 3):
            raise ValueError(f"GradientConfig.classes={self.classes!r} must be 2 or 3.")
        self._check_choices("GradientConfig")
        for name in ("d_model", "reader_layers", "num_heads", "epochs", "batch_size", "patience"):
            check_positive_int(name, getattr(self, name), "GradientConfig")
        if self.d_model % self.num_heads:
            raise ValueError(f"GradientConfig.num_heads={self.num_heads} must divide d_model={self.d_model}.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1) or isinstance(self.dropout, bool):
            raise ValueError(f"GradientConfig.dropout={self.dropout!r} must be a number in [0, 1).")
        for name in ("lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(
                    f"GradientConfig.{name}={v!r} must be a {'positive' if name == 'lr' else 'non-negative'} number."
                )
        if isinstance(self.abstention_patterns, str):
            raise ValueError(
                "GradientConfig.abstention_patterns must be a sequence of regular expressions, not one string."
            )
        self.abstention_patterns = tuple(self.abstention_patterns)
        for p in self.abstention_patterns:
            try:
                re.compile(p)
            except re.error as err:
                raise ValueError(
                    f"GradientConfig.abstention_patterns holds an invalid regular expression {p!r}: {err}."
                ) from None
        self.dropout, self.lr, self.weight_decay = float(self.dropout), float(self.lr), float(self.weight_decay)

    def select_blocks(self, num_blocks: int) -> list[int]:
        """Sorted indices of the selected blocks of a model with ``num_blocks`` blocks.

        Raises:
            ValueError: ``layers`` asks for more blocks than exist, or an index is out of range.
        """
        if self.layers == "all":
            return list(range(num_blocks))
        if isinstance(self.layers, int):
            if self.layers > num_blocks:
                raise ValueError(
                    f"GradientConfig.layers={self.layers} asks for the last {self.layers} blocks but the model has "
                    f"{num_blocks}; use layers<={num_blocks} or layers='all'."
                )
            return list(range(num_blocks - self.layers, num_blocks))
        out = set()
        for i in self.layers:  # type: ignore[union-attr]
            j = i + num_blocks if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(
                    f"GradientConfig.layers holds block index {i}, out of range for a model with {num_blocks} blocks."
                )
            out.add(j)
        return sorted(out)
