"""`RefineConfig`: how :func:`~hf_flowcheck.refinement.refine` rolls back and clamps (spec §7), and the
decoding options a rollback can honour.

Kept apart from the refinement loop so that the wrapper and the generate path can validate options
without importing it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from hf_flowcheck.configuration import VersionedConfig, check_positive_int

__all__ = ["CONFIG_FIELDS", "ROLLBACKS", "STRATEGIES", "RefineConfig", "check_rollback_decoding"]

STRATEGIES = ("flow", "random_depth", "regenerate", "resample")
ROLLBACKS = ("after_culprit", "culprit")


@dataclass(frozen=True)
class RefineConfig(VersionedConfig):
    """How :func:`refine` rolls back and clamps (spec §7), validated where it is built.

    Attributes:
        strategy: ``"flow"`` (clamp at the culprit block), ``"random_depth"`` (the same clamp at a
            uniformly random block drawn with ``seed``), ``"regenerate"`` (rollback, no clamp) or
            ``"resample"`` (the whole answer again from the prompt, no clamp: the baseline a user
            would otherwise pick).
        alpha: Clamp ratio ``α`` (> 0). Smaller is a stronger clamp. The default 0.5 was chosen on the
            validation split (``docs/results.md``); the paper's 1.05 changed no greedy answer's label there.
        band: Also clamp the ``band`` blocks on each side of the clamped block (``0``: that block only).
        clamp_positions: Clamp only this many positions from ``t0`` on (``None``: every position
            until the answer ends).
        num_culprits: ``m``: roll back to each of the ``m`` highest-scoring answer tokens in turn (each
            at its own highest-scoring block) and keep the candidate the validator scores lowest.
            With ``"resample"``, ``m`` whole answers are drawn and the lowest-scoring one is kept.
        num_competitors: ``K`` competitors of the top token for the basis.
        subspace_dim: ``k``, columns of ``U``.
        n_cal: Prefix positions before ``t0`` that give ``s_ref``.
        threshold: With ``rows=None``, refine rows whose flow score is above this (in ``[0, 1]``).
        seed: Seeds the random-depth draw (default 0) and, when given, ``torch.manual_seed(seed)``
            before each row's generation (for sampling).
        use_cache_prefix: Reuse the output's KV cache (default); ``False`` replays the whole prefix.
        rescore: Re-score each refined answer with the validator (default). ``False`` saves one
            teacher-forced extraction per row (``score_after`` is then ``nan``); it cannot be
            combined with ``num_culprits > 1``, which keeps the lowest-scoring candidate.
        rollback: Which token is drawn again. ``"after_culprit"`` (spec §7): the culprit token
            ``t0`` is kept and the answer regenerated from ``t0 + 1``, the token its state decides.
            ``"culprit"``: the culprit token itself is drawn again, from the state at ``t0 - 1``
            (the clamp covers ``t0 - 1`` on). The culprit is the riskiest *token* of the answer,
            which is most often a wrong word itself (``docs/results.md``), and ``"after_culprit"``
            keeps it. Ignored by ``"resample"``.

    Example:
        >>> RefineConfig(alpha=0.5).strategy
        'flow'
    """

    #: 2 added ``band``, ``clamp_positions``, ``num_culprits``, ``rescore`` and the ``"resample"`` strategy.
    #: 3 added ``rollback``.
    FORMAT_VERSION: ClassVar[int] = 3

    strategy: str = "flow"
    alpha: float = 0.5
    num_competitors: int = 32
    subspace_dim: int = 16
    n_cal: int = 64
    threshold: float = 0.5
    seed: int | None = None
    use_cache_prefix: bool = True
    band: int = 0
    clamp_positions: int | None = None
    num_culprits: int = 1
    rescore: bool = True
    rollback: str = "after_culprit"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"strategy={self.strategy!r} is not supported; use one of {', '.join(map(repr, STRATEGIES))}."
            )
        if self.rollback not in ROLLBACKS:
            raise ValueError(
                f"rollback={self.rollback!r} is not supported; use 'after_culprit' (keep the culprit token, "
                "regenerate after it) or 'culprit' (draw the culprit token again)."
            )
        for name in ("num_competitors", "subspace_dim", "n_cal", "num_culprits"):
            check_positive_int(name, getattr(self, name))
        if isinstance(self.band, bool) or not isinstance(self.band, int) or self.band < 0:
            raise ValueError(
                f"band={self.band!r} must be an integer >= 0 (blocks clamped on each side of the culprit block)."
            )
        if self.clamp_positions is not None:
            check_positive_int("clamp_positions", self.clamp_positions)
        if not isinstance(self.rescore, bool):
            raise ValueError(f"rescore={self.rescore!r} must be True or False.")
        if not self.rescore and self.num_culprits > 1:
            raise ValueError(
                f"rescore=False cannot be combined with num_culprits={self.num_culprits}: the candidates are "
                "compared by their scores after refinement. Keep rescore=True or set num_culprits=1."
            )
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not float(alpha) > 0:
            raise ValueError(f"alpha={alpha!r} must be positive (the paper uses 1.05).")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) <= 1.0:
            raise ValueError(
                f"threshold={t!r} must be a number in [0, 1] (flow scores are probabilities); rows scoring above "
                "it are refined."
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r} must be an integer or None.")


#: ``RefineConfig`` fields that :func:`refine` and ``model.refine`` also take as keyword arguments.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RefineConfig))


def check_rollback_decoding(generate_kwargs: dict[str, Any]) -> None:
    """Refuse, by name, the decoding options the rollback cannot honour (it continues one cached row)."""
    cfg = generate_kwargs.get("generation_config")
    for name, ok in (("use_cache", lambda v: v is not False), ("num_beams", lambda v: v in (None, 1))):
        value = generate_kwargs.get(name, getattr(cfg, name, None))
        if not ok(value):
            raise ValueError(
                f"{name}={value!r} is not supported by refine(): the rollback continues each answer from its cached "
                "prefix with greedy or sampled decoding. Drop it (refine uses the cache and one beam)."
            )
