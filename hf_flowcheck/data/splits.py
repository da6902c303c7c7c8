"""Seeded train/validation/test splits grouped by source record.

Splitting works on *uids* (source-record ids), so the two answers of a HaluEval pair -- which
share a uid -- always land in the same split. The order of a uid is a hash of ``(seed, uid)``,
so the split does not depend on the order the uids arrive in, and the few-shot records
(:data:`~hf_flowcheck.data.prompts.QA_SHOT_UIDS`) are excluded from every split by default.

Example:
    >>> from hf_flowcheck.data.splits import split_records
    >>> s = split_records([f"r{i}" for i in range(100)], seed=0)
    >>> len(s.train), len(s.validation), len(s.test)
    (70, 10, 20)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .prompts import QA_SHOT_UIDS

__all__ = ["SPLIT_NAMES", "Split", "select_split", "split_records"]

SPLIT_NAMES = ("train", "validation", "test")
T = TypeVar("T")


@dataclass(frozen=True)
class Split:
    """uids of each split (sorted by their seeded hash order).

    Attributes:
        train: Training uids.
        validation: Validation uids (model selection, thresholds, calibration).
        test: Test uids (report numbers here only).
        seed: The seed used.
    """

    train: tuple[str, ...]
    validation: tuple[str, ...]
    test: tuple[str, ...]
    seed: int

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in SPLIT_NAMES:
            raise KeyError(f"unknown split {name!r}; use one of {SPLIT_NAMES}.")
        return getattr(self, name)

    def without(self, uids: Iterable[str]) -> Split:
        """This split with ``uids`` removed; every other uid stays in the split it is in."""
        drop = {str(u) for u in uids}
        return Split(*(tuple(u for u in self[n] if u not in drop) for n in SPLIT_NAMES), self.seed)

    def split_of(self, uid: str) -> str | None:
        """Name of the split holding ``uid``, or ``None`` when it is in none (e.g. excluded)."""
        for name in SPLIT_NAMES:
            if uid in self._sets[name]:
                return name
        return None

    @property
    def _sets(self) -> dict[str, frozenset[str]]:
        cache = self.__dict__.get("_set_cache")
        if cache is None:
            cache = {n: frozenset(getattr(self, n)) for n in SPLIT_NAMES}
            object.__setattr__(self, "_set_cache", cache)
        return cache

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {"seed": self.seed, **{n: list(getattr(self, n)) for n in SPLIT_NAMES}}


def _key(seed: int, uid: str) -> bytes:
    return hashlib.sha256(f"{seed}\x00{uid}".encode()).digest()


def split_records(
    uids: Iterable[str],
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    exclude: Iterable[str] | None = QA_SHOT_UIDS,
) -> Split:
    """Split source-record uids into train/validation/test, grouped and seeded.

    Repeated uids (the two answers of a pair) count once. Sizes are ``round(f * n)`` for train
    and validation, the rest for test. Same uids + same seed -> same split, in any input order.

    Args:
        uids: Source-record uids (``Example.uid`` / ``LabeledExample.uid``), repeats allowed.
        seed: Seed of the hash order.
        fractions: ``(train, validation, test)``, non-negative, summing to 1.
        exclude: uids kept out of every split; default the QA few-shot records.

    Returns:
        A :class:`Split`.

    Raises:
        ValueError: Bad fractions, or a split would be empty (too few records).
    """
    fr = tuple(float(f) for f in fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ValueError(f"fractions={tuple(fractions)!r} must be three non-negative numbers summing to 1.")
    excluded = set(exclude or ())
    unique = sorted({str(u) for u in uids} - excluded, key=lambda u: (_key(seed, u), u))
    n = len(unique)
    n_train = round(fr[0] * n)
    n_val = round(fr[1] * n)
    n_val = min(n_val, n - n_train)
    parts = (unique[:n_train], unique[n_train : n_train + n_val], unique[n_train + n_val :])
    for name, part in zip(SPLIT_NAMES, parts):
        if not part:
            raise ValueError(
                f"split {name!r} would be empty with {n} unique records and fractions {fr}; load more records "
                "or change fractions."
            )
    return Split(tuple(parts[0]), tuple(parts[1]), tuple(parts[2]), seed)


def select_split(items: Iterable[T], split: Split, name: str, uid: Callable[[T], str] | None = None) -> list[T]:
    """Keep the items (records or labelled examples) whose uid is in split ``name``.

    Args:
        items: Objects with a ``.uid`` attribute (or give ``uid=``).
        split: The :class:`Split`.
        name: ``"train"``, ``"validation"`` or ``"test"``.
        uid: Function returning an item's uid (default ``item.uid``).
    """
    keep = split._sets[name] if name in SPLIT_NAMES else split[name]
    get = uid or (lambda x: x.uid)  # type: ignore[attr-defined]
    return [x for x in items if get(x) in keep]
