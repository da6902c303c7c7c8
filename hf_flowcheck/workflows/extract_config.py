"""`ExtractConfig`: how :func:`~hf_flowcheck.workflows.extract.extract_dataset` runs over a dataset.

The plain options of an extraction (protocol, batch and shard sizes, answer length, resume, progress)
have one owner here: ``flowcheck extract`` builds its flags from these fields, and
``extract_dataset(..., batch_size=4)`` keyword options override a given config's fields. What is not
a plain value (the judge, the prompt function, ``generate`` keyword arguments, an ``accelerate``
state) stays an argument of the function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from hf_flowcheck.configuration import VersionedConfig, check_positive_int

__all__ = ["PROTOCOLS", "ExtractConfig"]

PROTOCOLS = ("paired", "generated", "natural", "replayed")
"""``paired``/``natural``: teacher-forced given answers; ``generated``: the model answers, a judge labels;
``replayed``: the model's answers from an answers file (``hf_flowcheck.workflows.answers``), teacher-forced
token for token (capture during ``generate`` equals this replay)."""


@dataclass(frozen=True)
class ExtractConfig(VersionedConfig):
    """How a dataset is run through the model (the flow recipe itself is a ``FlowConfig``).

    Example:
        >>> ExtractConfig(protocol="paired", batch_size=4).shard_size
        256
    """

    FORMAT_VERSION: ClassVar[int] = 1

    protocol: str = field(
        metadata={
            "help": "generated (the model answers; a judge labels), paired (teacher-forced right/hallucinated "
            "answers; leaky, report with a length baseline), natural (given responses with their labels) or "
            "replayed (the model's own answers from an answers file). Never mix them in one store.",
            "choices": PROTOCOLS,
        }
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward/generate call."})
    shard_size: int = field(
        default=256,
        metadata={"help": "Input examples per shard (the unit of resume and of data-parallel work)."},
    )
    max_new_tokens: int = field(default=32, metadata={"help": "Generated protocol: most new tokens per answer."})
    resume: bool = field(
        default=True,
        metadata={"help": "Reuse complete shards of an earlier run with the same setup; off: refuse a non-empty out."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar (samples, rate, ETA)."})

    def __post_init__(self) -> None:
        self._check_choices("ExtractConfig")
        for name in ("batch_size", "shard_size", "max_new_tokens"):
            check_positive_int(name, getattr(self, name), "ExtractConfig", at_most=1 << 24)
        for name in ("resume", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ExtractConfig.{name}={getattr(self, name)!r} must be True or False.")
