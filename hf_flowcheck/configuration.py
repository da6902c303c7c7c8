"""Validated, versioned configuration dataclasses.

Every field carries help text in its metadata; ``__post_init__`` raises a ``ValueError`` that
names the field, the value and what is allowed. Saved configs carry the library version and a
format version so that an artifact written by one release is never silently misread by another.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from hf_flowcheck.version import __version__

__all__ = [
    "BASIS_SOLVERS",
    "EPS",
    "FULL_FEATURES",
    "LENS_FEATURES",
    "PAPER_FEATURES",
    "STATE_SUMMARIES",
    "FlowConfig",
    "VersionedConfig",
    "check_positive_int",
    "parse_positive_int",
    "versioned_fields",
]


#: Numerical safeguard in every denominator that holds a norm (paper B.5).
EPS = 1e-6

FULL_FEATURES: tuple[str, ...] = (
    "step",
    "step_centered",
    "turn",
    "attn_mag",
    "mlp_mag",
    "update_mag",
    "residual_ratio",
    "drift",
    "attn_turn_ratio",
    "mlp_turn_ratio",
)
PAPER_FEATURES: tuple[str, ...] = FULL_FEATURES[:8]
#: Readout-lens features of each (token, block) event, appended when ``FlowConfig.lens_features`` is on.
LENS_FEATURES: tuple[str, ...] = ("lens_top1", "lens_margin", "lens_entropy", "lens_rank")
STATE_SUMMARIES: tuple[str, ...] = ("none", "last", "mean", "token_confidence")
BASIS_SOLVERS: tuple[str, ...] = ("eigh", "subspace")


def versioned_fields(cls: type, data: dict[str, Any], format_version: int) -> dict[str, Any]:
    """Check a saved config dict against a dataclass: strip version stamps, refuse newer formats
    and unknown fields, and return the constructor keyword arguments."""
    name = cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{name}.from_dict() needs a dict, got {type(data).__name__}.")
    data = dict(data)
    fmt = data.pop("format_version", format_version)
    data.pop("hf_flowcheck_version", None)
    if fmt > format_version:
        raise ValueError(
            f"{name} format_version {fmt} is newer than this hf_flowcheck understands ({format_version}); "
            "upgrade hf_flowcheck."
        )
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Unknown {name} field(s) {unknown}; known fields: {sorted(known)}.")
    return data


_Config = TypeVar("_Config", bound="VersionedConfig")


class VersionedConfig:
    """What every config dataclass of the package shares: ``to_dict`` with version stamps and a
    ``from_dict`` that refuses unknown fields and newer formats.

    A subclass sets ``FORMAT_VERSION`` (bumped when a field's meaning or default changes) and, where
    older files need other defaults than today's, overrides :meth:`_upgrade`.
    """

    FORMAT_VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with version stamps, suitable for ``json.dumps`` (tuples become lists)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["format_version"] = self.FORMAT_VERSION
        out["hf_flowcheck_version"] = __version__
        return out

    @classmethod
    def _upgrade(cls, kwargs: dict[str, Any], format_version: int) -> dict[str, Any]:
        """Constructor arguments of a dict written in ``format_version`` (older formats' defaults)."""
        return kwargs

    @classmethod
    def from_dict(cls: type[_Config], data: Any) -> _Config:
        """Inverse of :meth:`to_dict`; unknown keys and newer format versions are refused."""
        if isinstance(data, cls):
            return data
        fmt = data.get("format_version", cls.FORMAT_VERSION) if isinstance(data, dict) else cls.FORMAT_VERSION
        kwargs = versioned_fields(cls, data, cls.FORMAT_VERSION)
        return cls(**cls._upgrade(kwargs, fmt if isinstance(fmt, int) else cls.FORMAT_VERSION))

    def replace(self: _Config, **changes: Any) -> _Config:
        """A copy with ``changes`` (validated again); an unknown option is a ``ValueError`` naming the known ones."""
        return type(self).with_options(self, changes)

    @classmethod
    def with_options(cls: type[_Config], base: _Config | None, options: dict[str, Any]) -> _Config:
        """``base`` (or the defaults) with ``options`` applied: how a function takes a config object and
        loose keyword options of the same fields. Unknown names are a ``ValueError`` naming the known ones."""
        if base is not None and not isinstance(base, cls):
            raise TypeError(f"Expected a config of type {cls.__name__}, got {type(base).__name__}.")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} option(s) {unknown}; known: {sorted(known)}.")
        return cls(**options) if base is None else dataclasses.replace(base, **options)  # type: ignore[type-var]

    def _check_choices(self, owner: str = "") -> None:
        """Refuse a value outside a field's ``metadata["choices"]`` (one owner for what is allowed)."""
        for f in fields(self):  # type: ignore[arg-type]
            allowed = f.metadata.get("choices")
            if allowed and getattr(self, f.name) not in allowed:
                raise ValueError(
                    f"{owner + '.' if owner else ''}{f.name}={getattr(self, f.name)!r} is not supported; use one of "
                    f"{', '.join(map(repr, allowed))}."
                )


def parse_positive_int(text: str) -> int:
    """Command-line text of an int >= 1 (a field's ``metadata["parse"]``); the message names the allowed values."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer; pass a positive integer.") from None
    if value < 1:
        raise ValueError(f"{value} is not positive; pass an integer >= 1.")
    return value


def check_positive_int(name: str, value: Any, owner: str = "", *, at_most: int | None = None) -> None:
    """Raise a ``ValueError`` naming ``owner.name`` unless ``value`` is an int >= 1 (bools refused).

    ``at_most`` bounds it too: a size read from a hand-edited file is refused before anything of that
    size is allocated.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner + '.' if owner else ''}{name}={value!r} must be a positive integer.")
    if at_most is not None and value > at_most:
        raise ValueError(
            f"{owner + '.' if owner else ''}{name}={value!r} is larger than {at_most}, more than any validator "
            "needs; the config was probably edited by hand. Use a value <= the bound."
        )


@dataclass
class FlowConfig(VersionedConfig):
    """How flow signatures are computed (spec ``flow-signatures.md``; defaults from paper B.6).

    Example:
        >>> FlowConfig(window_length=4, window_stride=2).num_features
        10
    """

    #: 2 added ``score_terminators`` (default False; format-1 dicts load with True).
    FORMAT_VERSION: ClassVar[int] = 2

    boundary: str = field(
        default="normalized",
        metadata={
            "help": "Monitored state: 'normalized' = N_b(r_b) (paper §3.1) or 'residual' = raw r_b "
            "(the authors' released code).",
            "choices": ("normalized", "residual"),
        },
    )
    token_mask: str = field(
        default="response",
        metadata={
            "help": "'response': generated/answer tokens only; 'all': every non-pad, non-special token.",
            "choices": ("response", "all"),
        },
    )
    window_length: int = field(default=8, metadata={"help": "Window length L in blocks (A.3)."})
    window_stride: int = field(default=4, metadata={"help": "Window stride s in blocks (A.3)."})
    num_competitors: int = field(default=32, metadata={"help": "Competitors K per (token, block) readout (A.4)."})
    subspace_dim: int = field(default=16, metadata={"help": "Subspace dimension k (A.5)."})
    direction_cap: int = field(
        default=1024, metadata={"help": "Most competitor directions per window; bounds readout cost (A.5)."}
    )
    transport_min_overlap: float = field(
        default=0.0,
        metadata={
            "help": "tau_sigma of Eq. 34: reset the transport to I_k when the smallest overlap singular "
            "value is below it. 0 (default) never resets, which keeps Lemma 3.2 exact."
        },
    )
    center: str = field(
        default="geometric_median",
        metadata={
            "help": "Center of the increments per depth: 'geometric_median', 'coordinate_median' or 'mean'.",
            "choices": ("geometric_median", "coordinate_median", "mean"),
        },
    )
    drift_anchor: str = field(
        default="end",
        metadata={"help": "Drift anchor block: window 'end' (§3.3.3) or 'start' (A.8).", "choices": ("end", "start")},
    )
    features: str = field(
        default="full",
        metadata={
            "help": "'full' (10 features, the authors' validator) or 'paper' (the 8 of §3.4).",
            "choices": ("full", "paper"),
        },
    )
    seed: int = field(default=0, metadata={"help": "seed0 of the direction-cap sampler."})
    lens_features: bool = field(
        default=False,
        metadata={
            "help": "Append 4 readout-lens features per event (after block b, through the final norm and the "
            "full readout: top-1 probability, margin to the runner-up, entropy over the top num_competitors, "
            "log1p rank of the token the model finally prefers). Not in the spec; costs one full-vocabulary "
            "readout per (answer token, block)."
        },
    )
    lens_candidates: int = field(
        default=0,
        metadata={
            "help": "0 (default): the lens channels read out the full vocabulary at every block (exact). K > 0: "
            "an approximation -- each answer token's candidate set is the top K of the last block's readout "
            "(which holds the token the model prefers), every block is read out on those K rows only, and "
            "the four channels are computed within them (probabilities renormalised over the K, rank capped "
            "at K - 1). One full readout per token instead of one per (token, block): about B times cheaper."
        },
    )
    competitor_candidates: int = field(
        default=0,
        metadata={
            "help": "0 (default): each (token, block) ranks its competitors over the whole vocabulary (the spec). "
            "C > 0: a sample's candidate set is the union of its answer tokens' top C of the last block's "
            "readout, and every (token, block) ranks its top token and K competitors within that set (ties "
            "still to the smaller token id). One full-vocabulary readout per answer token instead of one per "
            "read-out (token, block) pair (7x fewer at the defaults). Not an approximation of the spec's "
            "features: the intermediate blocks' own top tokens are mostly outside the set, so the competitor "
            "directions, bases and features change (docs/performance.md); a validator must be trained on them."
        },
    )
    basis_solver: str = field(
        default="eigh",
        metadata={
            "help": "How each window's top-k directions are found when it has at least 4k of them: 'eigh' "
            "(default, the full d x d eigensolve) or 'subspace' (block subspace iteration on the same matrix, "
            "kept only when its Davis-Kahan bound on the angle to the exact subspace is below 2e-3, else the "
            "eigensolve). Both give the same subspace to float32 precision; a window's fit is about 1.75x "
            "faster with 'subspace' at d=576, k=16.",
            "choices": BASIS_SOLVERS,
        },
    )
    state_summary: str = field(
        default="none",
        metadata={
            "help": "Also keep the residual state entering every block (and after the last) of the answer: "
            "'last' (at the last answer token, the hidden-state probe's input), 'mean' (averaged over the "
            "answer tokens), 'token_confidence' (not a residual state: the answer's -mean log p, -min log p "
            "and mean entropy over the scored tokens, [N, 1, 3], read from the final residual at each "
            "token's predicting position) or 'none'. Read by flow + state validators.",
            "choices": STATE_SUMMARIES,
        },
    )

    score_terminators: bool = field(
        default=False,
        metadata={
            "help": "Also score the answer's terminators: the whitespace-only tokens (a stop newline, trailing "
            "spaces) after its last content token. False (default): the score, the culprit and any state "
            "summary read only what the answer says, so the same answer scores the same however it ended. "
            "True is how validators before config format 2 were trained (they load with it)."
        },
    )

    def __post_init__(self) -> None:
        self._check_choices()
        for flag in ("lens_features", "score_terminators"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag}={getattr(self, flag)!r} must be True or False.")
        for name in ("window_length", "window_stride", "num_competitors", "subspace_dim", "direction_cap"):
            check_positive_int(name, getattr(self, name), at_most=1 << 20)
        cand = self.lens_candidates
        if isinstance(cand, bool) or not isinstance(cand, int) or cand < 0:
            raise ValueError(f"lens_candidates={cand!r} must be 0 (exact, full vocabulary) or a positive integer.")
        if cand and cand < max(self.num_competitors, 2):
            raise ValueError(
                f"lens_candidates={cand} is smaller than num_competitors={self.num_competitors}: the entropy channel "
                f"ranks the top num_competitors within the candidates. Use lens_candidates >= "
                f"{max(self.num_competitors, 2)} (e.g. 64) or 0 for the exact readout."
            )
        if cand and not self.lens_features:
            raise ValueError("lens_candidates only applies to the lens channels; set lens_features=True or leave it 0.")
        comp = self.competitor_candidates
        if isinstance(comp, bool) or not isinstance(comp, int) or comp < 0:
            raise ValueError(
                f"competitor_candidates={comp!r} must be 0 (exact, full vocabulary) or a positive integer."
            )
        if comp and comp <= self.num_competitors:
            raise ValueError(
                f"competitor_candidates={comp} leaves no room for the top token and num_competitors="
                f"{self.num_competitors} competitors within one token's candidates. Use competitor_candidates > "
                f"{self.num_competitors} (e.g. 256) or 0 for the whole vocabulary."
            )
        if self.window_stride > self.window_length:
            raise ValueError(
                f"window_stride={self.window_stride} is larger than window_length={self.window_length}: "
                "some blocks would fall in no window. Use window_stride <= window_length."
            )
        if not 0.0 <= float(self.transport_min_overlap) < 1.0:
            raise ValueError(f"transport_min_overlap={self.transport_min_overlap!r} must lie in [0, 1).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r} must be a non-negative integer.")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Names of the feature channels, in tensor order."""
        base = FULL_FEATURES if self.features == "full" else PAPER_FEATURES
        return base + LENS_FEATURES if self.lens_features else base

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @classmethod
    def _upgrade(cls, kwargs: dict[str, Any], format_version: int) -> dict[str, Any]:
        # A format-1 dict (written before score_terminators existed) keeps scoring the terminator
        # tokens its validator was trained on.
        if format_version < 2:
            kwargs.setdefault("score_terminators", True)
        return kwargs

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def signature_key(self) -> str:
        """A string that identifies everything that changes the features (used by manifests)."""
        d = dataclasses.asdict(self)
        # Fields added after format 1 are left out at their defaults, so earlier stores keep their key.
        for name, default in (
            ("lens_features", False),
            ("lens_candidates", 0),
            ("competitor_candidates", 0),
            ("state_summary", "none"),
            ("basis_solver", "eigh"),
            ("score_terminators", True),
        ):
            if d[name] == default:
                del d[name]
        return json.dumps(d, sort_keys=True)

    def same_features(self, other: FlowConfig) -> bool:
        """Whether ``other`` computes the same features: equal in every field but ``basis_solver``,
        which changes how, not what (both solvers find the same subspace to float32 precision)."""
        return dataclasses.replace(self, basis_solver="eigh") == dataclasses.replace(other, basis_solver="eigh")
