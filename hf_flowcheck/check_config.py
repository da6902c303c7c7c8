"""`FlowCheckConfig`: every flow option of one ``generate`` call, validated once.

Shaped like transformers' ``WatermarkingConfig``: pass ``generate(..., flow_check_config=FlowCheckConfig(...))``
or the loose ``return_flow_scores`` / ``flow_*`` keyword arguments (also read from a
``GenerationConfig``), which build one. The wrapper, the streaming check and the rollback all read
this one object; none re-checks an option.

Example:
    >>> cfg = FlowCheckConfig(return_flow_scores=True, check_every=4, abstain_threshold=0.9)
    >>> cfg.wants_flow
    True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from hf_flowcheck.extraction import STREAM_REFITS

__all__ = ["FLOW_GENERATE_KWARGS", "FlowCheckConfig"]

#: generate() keyword -> FlowCheckConfig field (the keywords never reach transformers).
FLOW_GENERATE_KWARGS: dict[str, str] = {
    "return_flow_scores": "return_flow_scores",
    "return_flow_features": "return_flow_features",
    "flow_check_every": "check_every",
    "flow_check_refit": "check_refit",
    "flow_abstain_threshold": "abstain_threshold",
    "flow_abstain_message": "abstain_message",
    "flow_rollback_threshold": "rollback_threshold",
    "flow_max_rollbacks": "max_rollbacks",
}


def _threshold_ok(value: Any) -> bool:
    if isinstance(value, str):
        return value == "recommended"
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0


@dataclass(frozen=True)
class FlowCheckConfig:
    """The flow options of one ``generate`` call (the ``flow_*`` keyword of each field is named in errors).

    Attributes:
        return_flow_scores: Return a ``FlowGenerateOutput`` with the validator's scores and culprits.
        return_flow_features: Also return the :class:`~hf_flowcheck.FlowFeatures`.
        check_every: Score every row every this many tokens while generating (``None``: no check).
        check_refit: ``"always"`` or ``"doubling"``: when a streaming check refits the window bases.
        abstain_threshold: A running score above it stops the row with ``abstain_message``; a number in
            ``[0, 1]`` or ``"recommended"`` (the validator's threshold chosen on validation).
        abstain_message: Default ``"I am not sure."``.
        rollback_threshold: A running score above it rolls the row back to its culprit and regenerates
            it under the block clamp in the same call.
        max_rollbacks: Rollback candidates per row (default 1).

    Raises:
        ValueError: A bad value, or an option whose partner is missing (the message says which).
    """

    return_flow_scores: bool = False
    return_flow_features: bool = False
    check_every: int | None = None
    check_refit: str | None = None
    abstain_threshold: float | str | None = None
    abstain_message: str | None = None
    rollback_threshold: float | str | None = None
    max_rollbacks: int | None = None

    def __post_init__(self) -> None:
        for flag in ("return_flow_scores", "return_flow_features"):
            value = getattr(self, flag)
            if not isinstance(value, bool):  # a string such as "no" would otherwise read as True
                raise ValueError(f"{flag}={value!r} must be True or False.")
        every = self.check_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(
                f"flow_check_every={every!r} must be a positive integer (check the running score every this many "
                "tokens; 1 = every token), or None for no streaming check."
            )
        for name in ("abstain_threshold", "rollback_threshold"):
            value = getattr(self, name)
            if value is None:
                continue
            if not every:
                raise ValueError(
                    f"flow_{name} needs flow_check_every (how often the running score is checked); pass "
                    f"flow_check_every=1 (every token) or a larger integer, or drop flow_{name}."
                )
            if not _threshold_ok(value):
                raise ValueError(
                    f"flow_{name}={value!r} must be a number in [0, 1] (flow scores are probabilities) or "
                    "'recommended'."
                )
        if self.check_refit is not None and self.check_refit not in STREAM_REFITS:
            raise ValueError(
                f"flow_check_refit={self.check_refit!r} is not supported; use one of "
                f"{', '.join(map(repr, STREAM_REFITS))}."
            )
        if self.max_rollbacks is not None:
            if self.rollback_threshold is None:
                raise ValueError("flow_max_rollbacks needs flow_rollback_threshold (when to roll back); pass both.")
            n = self.max_rollbacks
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"flow_max_rollbacks={n!r} must be a positive integer (rollbacks per row).")
        if self.abstain_threshold is not None and self.rollback_threshold is not None:
            raise ValueError(
                "flow_abstain_threshold and flow_rollback_threshold both ask what to do when the running score is "
                "too high; pass one of them."
            )
        if self.abstain_message is not None and not isinstance(self.abstain_message, str):
            raise ValueError(f"flow_abstain_message={self.abstain_message!r} must be a string.")

    @property
    def wants_flow(self) -> bool:
        """Whether the call needs the flow-checked path at all."""
        return bool(self.return_flow_scores or self.return_flow_features or self.check_every)

    @classmethod
    def from_generate_kwargs(cls, kwargs: dict[str, Any]) -> FlowCheckConfig:
        """Pop ``flow_check_config`` and the loose flow keywords (and their ``generation_config`` attributes)
        from ``kwargs``; a ``generation_config`` carrying them is replaced by a copy without them.

        Raises:
            ValueError: Both a ``flow_check_config`` and loose flow keywords, or bad values.
            TypeError: ``flow_check_config`` is not a :class:`FlowCheckConfig`.
        """
        given = kwargs.pop("flow_check_config", None)
        gen_cfg = kwargs.get("generation_config")
        loose: dict[str, Any] = {}
        for name, fld in FLOW_GENERATE_KWARGS.items():
            value = kwargs.pop(name, None)
            if value is None and gen_cfg is not None:
                value = getattr(gen_cfg, name, None)
            if value is not None:
                loose[fld] = value
        if gen_cfg is not None and any(hasattr(gen_cfg, n) for n in FLOW_GENERATE_KWARGS):
            kwargs["generation_config"] = gen_cfg.__class__.from_dict(
                {k: v for k, v in gen_cfg.to_dict().items() if k not in FLOW_GENERATE_KWARGS}
            )
        if given is not None:
            if not isinstance(given, cls):
                raise TypeError(f"flow_check_config must be a FlowCheckConfig, got {type(given).__name__}.")
            if loose:
                raise ValueError(
                    f"flow_check_config and the loose flow keywords {sorted(loose)} were both given; put them in the "
                    "config (dataclasses.replace(config, ...)) or pass only the keywords."
                )
            return given
        return cls(**loose)

    def with_stream(self) -> FlowCheckConfig:
        """This config for a ``FlowTextStreamer`` call: a running check every token unless one is set."""
        return self if self.check_every else dataclasses.replace(self, check_every=1)
