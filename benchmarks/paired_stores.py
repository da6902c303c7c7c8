"""The same detector on two feature stores of the same answers: a paired test-split difference.

Reads two ``validator_selection.py`` reports run on stores of the same answers (for example the spec's
features and ``FlowConfig(competitor_candidates=C)``), checks that their seed-0 test rows are the
same answers, and prints, for each row name they share, both test AUROCs, the mean over the split
seeds both ran, and a paired bootstrap interval of "first minus second" on the seed-0 test answers.
Labels come from ``--parts`` (the first report's store).

Run: ``python benchmarks/paired_stores.py runs/sel/smol-p01-cand256.json runs/sel/smol-p01-exact.json
--parts runs/replay/smol-qa-p01 --out runs/sel/smol-p01-paired.json``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from compare_subset import paired_difference

from hf_flowcheck.workflows.replay import PartedStore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--parts", required=True, help="a store of these answers (for the labels)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    one, two = (json.loads(Path(x).read_text()) for x in (a.first, a.second))
    s1, s2 = one["seeds"]["0"], two["seeds"]["0"]
    if s1["test_uids"] != s2["test_uids"]:
        raise SystemExit("the two reports' seed-0 test splits are different answers")
    _, labels, uids = PartedStore(a.parts).load()
    index = {u: i for i, u in enumerate(uids)}
    y = labels.numpy()[[index[u] for u in s1["test_uids"]]]
    seeds = sorted(set(one["seeds"]) & set(two["seeds"]))
    report = {"first": a.first, "second": a.second, "test_answers": len(y), "seeds": seeds, "rows": {}}
    for name in s1["rows"]:
        if name not in s2["rows"] or "test_scores" not in s1["rows"][name]:
            continue
        r1, r2 = s1["rows"][name], s2["rows"][name]
        means = [float(np.mean([rep["seeds"][s]["rows"][name]["test_auroc"] for s in seeds])) for rep in (one, two)]
        diff = paired_difference(y, np.array(r1["test_scores"]), np.array(r2["test_scores"]))
        report["rows"][name] = {
            "first": [r1["test_auroc"], r1["test_ci"]],
            "second": [r2["test_auroc"], r2["test_ci"]],
            "mean_over_seeds": means,
            "paired_difference": diff,
        }
        print(
            f"{name:32s} {r1['test_auroc']:.3f} vs {r2['test_auroc']:.3f} (means over seeds {seeds}: "
            f"{means[0]:.3f} vs {means[1]:.3f}); first minus second [{diff[0]:+.3f}, {diff[1]:+.3f}]"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
