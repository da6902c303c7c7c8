"""Metrics with bootstrap intervals for hallucination detectors (numpy only).

Conventions, for every function here: **label 1 = hallucinated** (or, for abstention sets such
as SelfAware, "should abstain"), **higher score = more likely hallucinated**. Metrics that are
undefined on the data (e.g. AUROC with one class) return ``nan``; :func:`evaluate_scores`
reports those as ``None`` so the result stays JSON-serialisable.

Example:
    >>> import numpy as np
    >>> from hf_flowcheck.metrics import auroc, evaluate_scores, format_table
    >>> auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> res = evaluate_scores([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], n_bootstrap=50, name="demo")
    >>> print(format_table([res]))  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "METRICS",
    "accuracy_at_threshold",
    "aurc",
    "auroc",
    "average_precision",
    "bootstrap_ci",
    "class_accuracy",
    "evaluate_scores",
    "expected_calibration_error",
    "fit_platt",
    "format_table",
    "length_baseline",
    "length_matched_indices",
    "length_matched_subset",
    "length_scores",
    "paired_auroc_difference",
    "precision_at_recall",
    "precision_recall_curve",
    "rankdata_average",
    "recall_at_precision",
    "risk_coverage_curve",
    "token_counter",
]

ArrayLike = Sequence[float] | np.ndarray


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``labels`` (0/1) and ``scores`` (finite or +-inf, no NaN)."""
    try:
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"scores must be numbers (higher = more likely hallucinated): {err}") from None
    lab = labels if isinstance(labels, np.ndarray) else np.asarray(list(labels), dtype=object)
    if lab.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D; got shapes {lab.shape} and {s.shape}.")
    if lab.shape[0] != s.shape[0]:
        raise ValueError(f"labels ({lab.shape[0]}) and scores ({s.shape[0]}) differ in length.")
    if s.shape[0] == 0:
        raise ValueError("no items to evaluate (labels and scores are empty).")
    if lab.dtype == object and any(v is None for v in lab.tolist()):
        raise ValueError(
            "labels contain None (unlabelled items, e.g. judge-dropped answers); drop them before "
            "evaluating, e.g. use GeneratedLabels.labelled."
        )
    try:
        y = np.asarray(lab, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("labels must be 0 (correct) or 1 (hallucinated).") from None
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0 (correct) or 1 (hallucinated); found {sorted(set(y[bad].tolist()))[:5]}.")
    nan = np.isnan(s)
    if nan.any():
        idx = np.flatnonzero(nan)
        raise ValueError(
            f"scores contain {idx.size} NaN value(s) (first at indices {idx[:5].tolist()}); the detector "
            "produced NaN -- fix it or drop those items (and their labels) before evaluating."
        )
    return y.astype(np.int64), s


# ---------------------------------------------------------------------------------------------
# Ranking metrics
# ---------------------------------------------------------------------------------------------


def rankdata_average(values: ArrayLike) -> np.ndarray:
    """1-based ranks with ties given their average rank (like ``scipy.stats.rankdata``)."""
    v = np.asarray(values, dtype=np.float64)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    avg = upper - (counts - 1) / 2.0
    return avg[inverse.reshape(-1)]


def auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann-Whitney U; ties count one half).

    Returns:
        AUROC in ``[0, 1]`` (0.5 = chance), or ``nan`` when only one class is present.
    """
    y, s = _check(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata_average(s)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_recall_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall at every distinct threshold, "predict 1 when score >= t".

    Returns:
        ``(precision, recall, thresholds)``, thresholds in decreasing order. Recall is ``nan``
        when there is no positive item.
    """
    y, s = _check(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), y.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    n_pos = y.sum()
    recall = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
    return precision, recall, s_sorted[last]


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (AUPRC): ``sum_k (R_k - R_{k-1}) P_k`` over distinct thresholds.

    Returns:
        AP in ``[0, 1]`` (chance = positive rate), or ``nan`` without positives.
    """
    precision, recall, _ = precision_recall_curve(labels, scores)
    if np.isnan(recall).any():
        return float("nan")
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def precision_at_recall(labels: ArrayLike, scores: ArrayLike, recall: float = 0.8) -> float:
    """Best precision among thresholds whose recall is at least ``recall`` (``nan`` without positives)."""
    prec, rec, _ = precision_recall_curve(labels, scores)
    if np.isnan(rec).any():
        return float("nan")
    ok = rec >= recall - 1e-12
    return float(prec[ok].max()) if ok.any() else float("nan")


def recall_at_precision(labels: ArrayLike, scores: ArrayLike, precision: float = 0.8) -> float:
    """Best recall among thresholds whose precision is at least ``precision`` (0.0 if none reaches it)."""
    prec, rec, _ = precision_recall_curve(labels, scores)
    if np.isnan(rec).any():
        return float("nan")
    ok = prec >= precision - 1e-12
    return float(rec[ok].max()) if ok.any() else 0.0


# ---------------------------------------------------------------------------------------------
# Threshold metrics
# ---------------------------------------------------------------------------------------------


def accuracy_at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> float:
    """Accuracy of "predict hallucinated when score >= threshold"."""
    y, s = _check(labels, scores)
    return float(np.mean((s >= threshold).astype(np.int64) == y))


def class_accuracy(labels: ArrayLike, scores: ArrayLike, cls: int, threshold: float = 0.5) -> float:
    """Accuracy on the items of class ``cls`` only (class 1: recall; class 0: specificity).

    Returns:
        The accuracy, or ``nan`` when the class is absent.
    """
    if cls not in (0, 1):
        raise ValueError(f"cls={cls!r} must be 0 or 1.")
    y, s = _check(labels, scores)
    mask = y == cls
    if not mask.any():
        return float("nan")
    return float(np.mean((s[mask] >= threshold).astype(np.int64) == cls))


# ---------------------------------------------------------------------------------------------
# Abstention
# ---------------------------------------------------------------------------------------------


def risk_coverage_curve(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """Selective risk vs coverage when abstaining on the highest scores first.

    The items are kept lowest score first; at coverage ``k/n`` the risk is the fraction of kept
    items with label 1. Tied scores are handled exactly by their expected risk under a random
    order within the tie, so the curve does not depend on input order.

    Returns:
        ``{"coverage", "risk", "selective_accuracy"}`` (lists of ``n`` floats, coverage ``1/n ..
        1``) and ``"aurc"``: the area under the risk-coverage curve (mean risk; lower is better).
    """
    y, s = _check(labels, scores)
    risk = _risk(y, s)
    k = np.arange(1, y.size + 1)
    return {
        "coverage": (k / y.size).tolist(),
        "risk": risk.tolist(),
        "selective_accuracy": (1.0 - risk).tolist(),
        "aurc": float(risk.mean()),
    }


def _risk(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Expected selective risk after keeping the ``k`` lowest scores, ``k = 1..n``."""
    n = y.size
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    errors = np.bincount(inverse.reshape(-1), weights=y.astype(np.float64), minlength=uniq.size)
    start = np.r_[0, np.cumsum(counts)[:-1]]
    err_before = np.r_[0.0, np.cumsum(errors)[:-1]]
    rate = errors / counts
    k = np.arange(1, n + 1)
    group = np.repeat(np.arange(uniq.size), counts)  # group of the k-th kept item (0-based k-1)
    expected_errors = err_before[group] + (k - start[group]) * rate[group]
    return expected_errors / k


def aurc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the risk-coverage curve (lower = better abstention). See :func:`risk_coverage_curve`."""
    y, s = _check(labels, scores)
    return float(_risk(y, s).mean())


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def fit_platt(logits: ArrayLike, labels: ArrayLike, *, l2: float = 1e-4, max_iter: int = 50) -> tuple[float, float]:
    """Platt scaling: ``(a, b)`` such that ``sigmoid(a * logit + b)`` is calibrated on ``labels``.

    Newton's method on the mean log-loss of the two parameters (a tiny ``l2`` on ``a - 1`` and ``b``
    keeps it defined when the classes separate perfectly).

    Args:
        logits: ``[N]`` finite detector logits (higher = more likely hallucinated).
        labels: ``[N]`` 0/1, both classes present.
        l2: Ridge penalty towards the identity map ``(1, 0)``.
        max_iter: Newton steps (it converges in a handful).

    Returns:
        ``(a, b)``; ``a <= 0`` means the logits rank these labels the wrong way round (or not at all).

    Example:
        >>> a, b = fit_platt([-2.0, -1.0, 1.0, 2.0, 0.5, -0.5], [0, 0, 1, 1, 0, 1])
        >>> a > 0
        True
    """
    y, x = _check(labels, logits)
    if y.min() == y.max():
        raise ValueError("fit_platt() needs both labels (correct and hallucinated answers) among the calibration rows.")
    if not np.isfinite(x).all():
        raise ValueError("fit_platt() needs finite logits; drop the nan rows (answers without events) first.")
    prior = np.array([1.0, 0.0])
    design = np.stack([x, np.ones_like(x)], axis=1)  # [N, 2]

    def loss(t: np.ndarray) -> float:
        z = design @ t  # mean log-loss, computed stably: log(1 + e^z) - y z
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * ((t - prior) ** 2).sum())

    theta = prior.copy()
    current = loss(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # sigmoid without overflow
        grad = design.T @ (p - y) / y.size + l2 * (theta - prior)
        hess = (design * (p * (1 - p))[:, None]).T @ design / y.size + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-6 and loss(theta - scale * step) > current:  # damped: never a worse fit
            scale *= 0.5
        theta = theta - scale * step
        new = loss(theta)
        if current - new < 1e-12:
            break
        current = new
    return float(theta[0]), float(theta[1])


def expected_calibration_error(labels: ArrayLike, scores: ArrayLike, *, bins: int = 10) -> float:
    """Expected calibration error of probabilities ``scores`` in ``[0, 1]``: equal-width bins, weighted by count."""
    y, s = _check(labels, scores)
    idx = np.minimum((s * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.sum() / y.size * abs(float(y[m].mean()) - float(s[m].mean()))
    return float(err)


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _bootstrap_values(
    metric_fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, s: np.ndarray, n: int, seed: int
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = y.size
    out = np.empty(n, dtype=np.float64)
    for i in range(n):
        idx = rng.integers(0, m, size=m)
        out[i] = metric_fn(y[idx], s[idx])
    return out


def paired_auroc_difference(
    labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike, n: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``AUROC(a) - AUROC(b)`` over the same resampled answers.

    Args:
        labels: ``[N]`` 0/1 labels.
        scores_a: ``[N]`` scores of detector a.
        scores_b: ``[N]`` scores of detector b on the same answers.
        n: Resamples (those with one class only are skipped).
        seed: Seed.
        alpha: ``1 - confidence``.

    Returns:
        ``(low, high)``; an interval that excludes 0 says a and b differ on these answers.
    """
    y, a = _check(labels, scores_a)
    _, b = _check(labels, scores_b)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(y), len(y))
        if y[i].min() == y[i].max():
            continue
        diffs.append(auroc(y[i], a[i]) - auroc(y[i], b[i]))
    if not diffs:
        return float("nan"), float("nan")
    lo, hi = np.quantile(diffs, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    labels: ArrayLike,
    scores: ArrayLike,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(labels, scores)``.

    Items are resampled with replacement ``n`` times with ``numpy.random.default_rng(seed)``;
    resamples where the metric is undefined (``nan``, e.g. one class only) are left out.

    Args:
        metric_fn: ``(labels, scores) -> float``.
        labels: 0/1 labels.
        scores: Detector scores.
        n: Number of resamples.
        seed: Seed (same seed, same interval).
        alpha: ``1 - confidence`` (0.05 -> 95% interval).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when no resample gives a defined value.
    """
    if n < 1:
        raise ValueError(f"n={n} must be >= 1 resamples.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha} must be in (0, 1); 0.05 gives a 95% interval.")
    y, s = _check(labels, scores)
    vals = _bootstrap_values(metric_fn, y, s, n, seed)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


# ---------------------------------------------------------------------------------------------
# Everything at once
# ---------------------------------------------------------------------------------------------


def _metric_table(
    threshold: float, target_recall: float, target_precision: float
) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    return {
        "auroc": auroc,
        "auprc": average_precision,
        "accuracy": lambda y, s: accuracy_at_threshold(y, s, threshold),
        "accuracy_class0": lambda y, s: class_accuracy(y, s, 0, threshold),
        "accuracy_class1": lambda y, s: class_accuracy(y, s, 1, threshold),
        f"precision_at_recall_{target_recall:g}": lambda y, s: precision_at_recall(y, s, target_recall),
        f"recall_at_precision_{target_precision:g}": lambda y, s: recall_at_precision(y, s, target_precision),
        "aurc": aurc,
    }


METRICS = tuple(_metric_table(0.5, 0.8, 0.8))
"""Metric names reported by :func:`evaluate_scores` with its default arguments."""


def _json_float(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def evaluate_scores(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    name: str | None = None,
    threshold: float = 0.5,
    target_recall: float = 0.8,
    target_precision: float = 0.8,
    n_bootstrap: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    cost_ratio: float | None = None,
    include_curve: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """All metrics of ``docs/evaluation.md`` with percentile bootstrap intervals.

    Args:
        labels: 0/1 labels (1 = hallucinated).
        scores: Detector scores (higher = more likely hallucinated); NaN raises.
        name: Row name for :func:`format_table` (detector / protocol / split).
        threshold: Decision threshold for the accuracies (predict 1 when ``score >= threshold``).
        target_recall: Recall for "precision at recall" (0.8).
        target_precision: Precision for "recall at precision" (0.8).
        n_bootstrap: Resamples (1000 for reported numbers).
        seed: Bootstrap seed.
        alpha: ``1 - confidence``.
        cost_ratio: Cost per sample as a ratio to plain generation, stored as given.
        include_curve: Also return the risk-coverage curve (``n`` points).
        extra: Extra JSON-serialisable fields to store (model id, split, protocol ...).

    Returns:
        A JSON-serialisable dict: ``name``, ``n``, ``n_positive``, ``n_negative``,
        ``threshold``, ``bootstrap`` settings, and ``metrics``: ``{metric: {"value", "low",
        "high"}}`` (``None`` where undefined).
    """
    y, s = _check(labels, scores)
    table = _metric_table(threshold, target_recall, target_precision)
    metrics: dict[str, dict[str, float | None]] = {}
    for key, fn in table.items():
        value = fn(y, s)
        lo, hi = bootstrap_ci(fn, y, s, n=n_bootstrap, seed=seed, alpha=alpha)
        metrics[key] = {"value": _json_float(value), "low": _json_float(lo), "high": _json_float(hi)}
    result: dict[str, Any] = {
        "name": name,
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
        "threshold": float(threshold),
        "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "alpha": float(alpha), "method": "percentile"},
        "metrics": metrics,
    }
    if cost_ratio is not None:
        result["cost_ratio"] = float(cost_ratio)
    if include_curve:
        result["risk_coverage"] = risk_coverage_curve(y, s)
    if extra:
        result.update(dict(extra))
    return result


def format_table(
    results: Mapping[str, Any] | Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    *,
    metrics: Sequence[str] | None = None,
    digits: int = 3,
) -> str:
    """Render :func:`evaluate_scores` results as an aligned text table (``print`` it).

    Args:
        results: One result, a list of results, or ``{row_name: result}``.
        metrics: Columns to show (default: every metric of the first result).
        digits: Decimals.

    Returns:
        The table; each cell is ``value [low, high]``.
    """
    if isinstance(results, Mapping) and "metrics" in results:
        rows = [(results.get("name") or "scores", results)]
    elif isinstance(results, Mapping):
        rows = [(str(k), v) for k, v in results.items()]
    else:
        rows = [(r.get("name") or f"row{i}", r) for i, r in enumerate(results)]
    if not rows:
        raise ValueError("format_table() got no results.")
    for label, r in rows:
        if not isinstance(r, Mapping) or "metrics" not in r:
            raise ValueError(f"result {label!r} is not an evaluate_scores() result (no 'metrics' key).")
    cols = list(metrics) if metrics is not None else list(rows[0][1]["metrics"])

    def cell(m: Mapping[str, Any] | None) -> str:
        if not m or m.get("value") is None:
            return "n/a"
        txt = f"{m['value']:.{digits}f}"
        if m.get("low") is not None and m.get("high") is not None:
            txt += f" [{m['low']:.{digits}f}, {m['high']:.{digits}f}]"
        return txt

    header = ["name", "n", "pos", *cols]
    body = [
        [label, str(r.get("n", "")), str(r.get("n_positive", "")), *[cell(r["metrics"].get(c)) for c in cols]]
        for label, r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    lines = [fmt(header), "  ".join("-" * w for w in widths), *[fmt(r) for r in body]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Paired-protocol length controls
# ---------------------------------------------------------------------------------------------

_TRAILING_PUNCT = re.compile(r"[\s" + re.escape(string.punctuation) + r"]+$")


def token_counter(tokenizer: Any = None) -> Callable[[str], int]:
    """Return ``text -> token count``: the tokenizer's (no special tokens) or whitespace words."""
    if tokenizer is None:
        return lambda text: len(text.split())
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def length_scores(answers: Iterable[str], count_fn: Callable[[str], int] | None = None) -> np.ndarray:
    """Length-only baseline scores: the answer length (default: characters).

    Args:
        answers: Answer texts.
        count_fn: Length function (default ``len``: characters; see :func:`token_counter`).

    Returns:
        ``float64[n]`` lengths (longer = "more likely hallucinated" for HaluEval QA pairs).
    """
    fn = count_fn or len
    return np.asarray([float(fn(a)) for a in answers], dtype=np.float64)


def length_baseline(
    answers: Sequence[str],
    labels: ArrayLike,
    *,
    count_fn: Callable[[str], int] | None = None,
    name: str = "length-only",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`evaluate_scores` of the answer length -- show it next to every paired result.

    Only the ranking metrics (AUROC, AUPRC, operating points, AURC) are meaningful; the 0.5
    threshold of the accuracies does not fit raw lengths.
    """
    return evaluate_scores(labels, length_scores(answers, count_fn), name=name, **kwargs)


def _strip_trailing_punct(text: str) -> str:
    return _TRAILING_PUNCT.sub("", text)


def length_matched_indices(
    uids: Sequence[str],
    answers: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    count_fn: Callable[[str], int] | None = None,
    max_diff: int = 2,
) -> np.ndarray:
    """Indices of the paired items whose two answers differ by at most ``max_diff`` tokens.

    Tokens are counted by ``count_fn`` (default whitespace words; see :func:`token_counter`)
    after stripping trailing punctuation and whitespace.

    Args:
        uids: Source uid per item; each uid must appear exactly twice (the pair).
        answers: Answer per item.
        labels: Optional labels; when given each pair must hold one 0 and one 1.
        count_fn: Token counter.
        max_diff: Largest allowed token-count difference (2 per ``docs/evaluation.md``).

    Returns:
        Sorted ``int64`` indices of both items of every matched pair.

    Raises:
        ValueError: Lengths differ, or a uid does not form a proper pair.
    """
    if len(uids) != len(answers) or (labels is not None and len(labels) != len(uids)):
        raise ValueError("uids, answers (and labels) must have the same length.")
    count = count_fn or token_counter(None)
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(uids):
        groups.setdefault(u, []).append(i)
    keep: list[int] = []
    for u, idx in groups.items():
        if len(idx) != 2:
            raise ValueError(
                f"uid {u!r} has {len(idx)} items; the paired protocol needs exactly two (right + hallucinated)."
            )
        if labels is not None and sorted(int(labels[i]) for i in idx) != [0, 1]:
            raise ValueError(f"uid {u!r} does not hold one label 0 and one label 1.")
        a, b = (count(_strip_trailing_punct(answers[i])) for i in idx)
        if abs(a - b) <= max_diff:
            keep.extend(idx)
    return np.asarray(sorted(keep), dtype=np.int64)


def length_matched_subset(
    examples: Sequence[Any], *, count_fn: Callable[[str], int] | None = None, max_diff: int = 2
) -> list[Any]:
    """The paired examples (objects with ``.uid``, ``.answer``, ``.label``) in length-matched pairs."""
    idx = length_matched_indices(
        [e.uid for e in examples],
        [e.answer for e in examples],
        [e.label for e in examples],
        count_fn=count_fn,
        max_diff=max_diff,
    )
    return [examples[i] for i in idx]
