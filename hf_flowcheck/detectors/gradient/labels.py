"""The third class: answers that abstain ("did not answer")."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from hf_flowcheck.detectors.gradient.config import ABSTENTION_PATTERNS

__all__ = ["abstention_labels", "is_abstention"]


def is_abstention(answer: str, patterns: Sequence[str] = ABSTENTION_PATTERNS) -> bool:
    """Whether ``answer`` declines to answer ("I don't know", "cannot be determined", ...).

    Example:
        >>> is_abstention("I don't know."), is_abstention("Paris")
        (True, False)
    """
    return any(re.search(p, answer, flags=re.IGNORECASE) for p in patterns)


def abstention_labels(
    labels: Sequence[int] | np.ndarray, answers: Sequence[str], patterns: Sequence[str] = ABSTENTION_PATTERNS
) -> np.ndarray:
    """3-class labels: 2 where the answer is an abstention, else the 0/1 label.

    Returns:
        ``int64[N]`` in ``{0, 1, 2}``.
    """
    y = np.asarray(labels, dtype=np.int64).copy()
    if len(answers) != y.shape[0]:
        raise ValueError(f"labels ({y.shape[0]}) and answers ({len(answers)}) differ in length.")
    for i, a in enumerate(answers):
        if is_abstention(a, patterns):
            y[i] = 2
    return y
