"""Metrics against hand-computed values, bootstrap intervals, tables and length controls."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from hf_flowcheck.metrics import (
    accuracy_at_threshold,
    aurc,
    auroc,
    average_precision,
    bootstrap_ci,
    class_accuracy,
    evaluate_scores,
    format_table,
    length_baseline,
    length_matched_indices,
    length_matched_subset,
    length_scores,
    precision_at_recall,
    rankdata_average,
    recall_at_precision,
    risk_coverage_curve,
    token_counter,
)


def test_rankdata_average_ties():
    assert rankdata_average([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]


def test_auroc_hand_values():
    y = [0, 0, 1, 1]
    assert auroc(y, [0.1, 0.2, 0.8, 0.9]) == 1.0  # perfect
    assert auroc(y, [0.9, 0.8, 0.2, 0.1]) == 0.0  # inverted
    assert auroc(y, [0.5, 0.5, 0.5, 0.5]) == 0.5  # all tied
    # pairs (pos, neg): (0.2,0.2)=1/2, (0.2,0.1)=1, (0.9,0.2)=1, (0.9,0.1)=1 -> 3.5/4
    assert auroc([0, 1, 0, 1], [0.2, 0.2, 0.1, 0.9]) == pytest.approx(0.875)
    assert math.isnan(auroc([1, 1], [0.1, 0.2]))  # one class: undefined


def test_average_precision_hand_values():
    # ranking 0.8(1) 0.4(0) 0.35(1) 0.1(0): AP = 0.5*1 + 0.5*(2/3)
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.5 + 1 / 3)
    assert average_precision([0, 1, 1], [0.1, 0.5, 0.9]) == 1.0
    assert average_precision([1, 0], [0.5, 0.5]) == 0.5  # a tie is one threshold
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_operating_points():
    y = [1, 1, 0, 1, 0, 1, 0, 0]
    s = [8, 7, 6, 5, 4, 3, 2, 1]
    # thresholds: recall 1/4..4/4 with precision 1, 1, 2/3, 3/4, 3/5, 4/6, ...
    assert precision_at_recall(y, s, 0.8) == pytest.approx(4 / 6)  # first threshold reaching recall 1.0
    assert precision_at_recall(y, s, 0.75) == pytest.approx(3 / 4)
    assert recall_at_precision(y, s, 0.8) == pytest.approx(0.5)
    assert recall_at_precision([0, 1], [1.0, 0.0], 0.8) == 0.0  # never reaches the precision


def test_accuracies():
    y = [0, 0, 1, 1, 1]
    s = [0.2, 0.6, 0.5, 0.9, 0.1]
    assert accuracy_at_threshold(y, s) == pytest.approx(3 / 5)  # 0.5 counts as hallucinated
    assert class_accuracy(y, s, 0) == pytest.approx(1 / 2)
    assert class_accuracy(y, s, 1) == pytest.approx(2 / 3)
    assert math.isnan(class_accuracy([1, 1], [0.1, 0.9], 0))


def test_risk_coverage_hand_values():
    # keep lowest scores first: 0.1(0), tie 0.5 {0,1}, 0.9(1)
    rc = risk_coverage_curve([0, 1, 0, 1], [0.1, 0.9, 0.5, 0.5])
    assert rc["coverage"] == [0.25, 0.5, 0.75, 1.0]
    assert rc["risk"] == pytest.approx([0.0, 0.25, 1 / 3, 0.5])
    assert rc["selective_accuracy"] == pytest.approx([1.0, 0.75, 2 / 3, 0.5])
    assert rc["aurc"] == pytest.approx((0 + 0.25 + 1 / 3 + 0.5) / 4)
    y = [0, 0, 1, 1]
    assert aurc(y, [0, 1, 2, 3]) < aurc(y, [3, 2, 1, 0])  # a good detector abstains on errors first
    # order invariance under ties
    assert aurc([1, 0, 1, 0], [1, 1, 1, 1]) == aurc([0, 0, 1, 1], [1, 1, 1, 1]) == 0.5


def test_input_errors():
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores([0, 1, 0], [0.1, float("nan"), 0.3], n_bootstrap=10)
    with pytest.raises(ValueError, match="None"):
        evaluate_scores([0, None, 1], [0.1, 0.2, 0.3], n_bootstrap=10)
    with pytest.raises(ValueError, match="0 \\(correct\\) or 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="length"):
        auroc([0, 1, 1], [0.1, 0.2])


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, y + rng.normal(0, 1.0, n)


def test_bootstrap_contains_point_and_is_seeded():
    y, s = _data()
    point = auroc(y, s)
    lo, hi = bootstrap_ci(auroc, y, s, n=300, seed=0)
    assert lo <= point <= hi and hi - lo < 0.3
    assert bootstrap_ci(auroc, y, s, n=300, seed=0) == (lo, hi)
    assert bootstrap_ci(auroc, y, s, n=300, seed=1) != (lo, hi)
    # undefined resamples are left out; all undefined -> nan interval
    assert all(math.isnan(v) for v in bootstrap_ci(auroc, [1, 1, 1], [0.1, 0.2, 0.3], n=20))


def test_evaluate_scores_json_and_intervals():
    y, s = _data()
    res = evaluate_scores(y, s, name="det", n_bootstrap=200, cost_ratio=1.05, include_curve=True)
    text = json.dumps(res)
    assert json.loads(text)["name"] == "det"
    assert set(res["metrics"]) == {
        "auroc",
        "auprc",
        "accuracy",
        "accuracy_class0",
        "accuracy_class1",
        "precision_at_recall_0.8",
        "recall_at_precision_0.8",
        "aurc",
    }
    for key, m in res["metrics"].items():
        assert m["low"] <= m["value"] <= m["high"], key
    assert res["metrics"]["auroc"]["value"] == pytest.approx(auroc(y, s))
    assert res["n"] == 200 and res["n_positive"] + res["n_negative"] == 200 and res["cost_ratio"] == 1.05
    assert len(res["risk_coverage"]["risk"]) == 200
    assert evaluate_scores(y, s, n_bootstrap=200)["metrics"] == evaluate_scores(y, s, n_bootstrap=200)["metrics"]
    one_class = evaluate_scores([1, 1, 1], [0.1, 0.5, 0.9], n_bootstrap=20)
    assert one_class["metrics"]["auroc"] == {"value": None, "low": None, "high": None}
    json.dumps(one_class)


def test_format_table_aligned():
    y, s = _data()
    a = evaluate_scores(y, s, name="flow", n_bootstrap=50)
    b = evaluate_scores(y, -s, name="inverted-detector", n_bootstrap=50)
    table = format_table([a, b], metrics=["auroc", "auprc"])
    lines = table.splitlines()
    assert len(lines) == 4 and lines[0].split()[:5] == ["name", "n", "pos", "auroc", "auprc"]
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "inverted-detector" in table and "[" in lines[2]
    assert format_table({"x": a}).splitlines()[2].startswith("x ")
    assert "n/a" in format_table(evaluate_scores([1, 1], [0.2, 0.3], n_bootstrap=5))


def test_length_helpers():
    answers = ["Delhi", "The Oberoi hotel company is based in Mumbai.", "Paris", "Lyon.", "a b c", "a b c d e f"]
    uids = ["u1", "u1", "u2", "u2", "u3", "u3"]
    labels = [0, 1, 0, 1, 0, 1]
    assert length_scores(answers[:2]).tolist() == [5.0, 44.0]
    assert length_scores(answers[:2], token_counter()).tolist() == [1.0, 8.0]
    idx = length_matched_indices(uids, answers, labels)
    assert idx.tolist() == [2, 3]  # u1 differs by 7 tokens, u3 by 3; u2 by 0 after stripping "."
    assert length_matched_indices(uids, answers, labels, max_diff=3).tolist() == [2, 3, 4, 5]

    class Ex:
        def __init__(self, uid, answer, label):
            self.uid, self.answer, self.label = uid, answer, label

    exs = [Ex(u, a, l) for u, a, l in zip(uids, answers, labels)]
    assert [e.uid for e in length_matched_subset(exs)] == ["u2", "u2"]
    with pytest.raises(ValueError, match="exactly two"):
        length_matched_indices(["u1", "u1", "u2"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="one label 0 and one label 1"):
        length_matched_indices(["u1", "u1"], ["a", "b"], [1, 1])

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return list(text)

    assert token_counter(Tok())("abc") == 3


def test_length_baseline_on_real_pairs_is_leaky():
    from hf_flowcheck.data import load_halueval_qa, paired_examples

    pairs = paired_examples(load_halueval_qa(limit=200))
    res = length_baseline([p.answer for p in pairs], [p.label for p in pairs], n_bootstrap=50)
    assert res["name"] == "length-only" and res["metrics"]["auroc"]["value"] > 0.9  # docs: ~0.97
    matched = length_matched_subset(pairs)
    assert 0 < len(matched) < len(pairs) and len(matched) % 2 == 0


def test_paired_auroc_difference():
    import numpy as np

    from hf_flowcheck.metrics import paired_auroc_difference

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 40)
    perfect = y + rng.normal(0, 0.1, y.size)
    noise = rng.normal(0, 1, y.size)
    lo, hi = paired_auroc_difference(y, perfect, noise, n=200)
    assert 0 < lo <= hi
    assert paired_auroc_difference(y, noise, noise, n=50) == (0.0, 0.0)


def test_fit_platt_recovers_a_logistic_map_and_refuses_bad_input():
    from hf_flowcheck.metrics import expected_calibration_error, fit_platt

    rng = np.random.default_rng(0)
    x = rng.normal(size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-(0.5 * x - 1.0)))).astype(int)
    a, b = fit_platt(x, y)
    assert abs(a - 0.5) < 0.05 and abs(b + 1.0) < 0.05
    assert expected_calibration_error(y, 1 / (1 + np.exp(-(a * x + b)))) < 0.02
    assert expected_calibration_error(y, 1 / (1 + np.exp(-x))) > 0.1
    with pytest.raises(ValueError, match="both labels"):
        fit_platt([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="finite logits"):
        fit_platt([0.1, float("inf")], [0, 1])
