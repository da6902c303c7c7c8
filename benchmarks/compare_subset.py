"""Score the store's detectors on the seeded test subset of costly `flowcheck compare` runs.

`flowcheck compare --max-eval N` scores sampling agreement and gradient signatures on the first N
test answers of the split (the costly detectors). This puts the shipped validators, the
hidden-state probes (1 and 3 depths, fitted on the whole training split) and exact token confidence
on exactly those answers next to them, with 95% intervals, and a paired bootstrap interval of the
difference "validator minus each costly detector" (the same resampled answers for both).

Run: ``python benchmarks/compare_subset.py --parts runs/replay/smol-qa
--compare runs/cmp/compare-v05-sampling150.json runs/cmp/compare-v05-gradient.json
--validator hf_flowcheck/bundled/validators/smollm2-135m-instruct-halueval-qa
--confidence runs/confidence-smol-qa-6000.json --out runs/cmp/subset-v05.json``
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.baselines import HiddenStateProbe
from hf_flowcheck.metrics import evaluate_scores, paired_auroc_difference
from hf_flowcheck.workflows.replay import load_parts


def _row(y: np.ndarray, s: np.ndarray) -> dict:
    m = evaluate_scores(y, s, name="x", n_bootstrap=1000, seed=0)["metrics"]
    return {
        "auroc": m["auroc"]["value"],
        "ci": [m["auroc"]["low"], m["auroc"]["high"]],
        "auprc": m["auprc"]["value"],
        "precision_at_recall_0.8": m["precision_at_recall_0.8"]["value"],
        "n": len(y),
        "positives": int(y.sum()),
    }


def paired_difference(y: np.ndarray, a: np.ndarray, b: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of ``AUROC(a) - AUROC(b)`` over the same resampled answers (the library's one owner)."""
    return list(paired_auroc_difference(y, a, b, n=n, seed=seed))


def store_arguments(p: argparse.ArgumentParser) -> None:
    """The options every store-scoring benchmark takes."""
    p.add_argument("--parts", required=True)
    p.add_argument("--validator", action="append", default=[])
    p.add_argument("--confidence", default=None, help="JSON from benchmarks/answer_confidence.py")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None)


def probe_scores(feats, y: np.ndarray, tr: np.ndarray, va: np.ndarray) -> dict[str, np.ndarray]:
    """Hidden-state probes at 1 depth (chosen on validation) and at 3 depths around it, fitted on ``tr``."""
    probe = HiddenStateProbe(kind="logistic").fit(feats.states[tr], y[tr], feats.states[va], y[va])
    n_bound = feats.states.shape[1]
    three = sorted({min(max(b, 0), n_bound - 1) for b in (probe.layer - 4, probe.layer, probe.layer + 4)})
    z3 = feats.states[:, three].reshape(len(feats), -1)
    probe3 = HiddenStateProbe(kind="logistic").fit(z3[tr, None], y[tr], z3[va, None], y[va])
    return {
        f"hidden-state probe, 1 depth (block {probe.layer})": np.asarray(probe.score(feats.states)),
        f"hidden-state probe, 3 depths {three}": np.asarray(probe3.score(z3[:, None])),
    }


def confidence_scores(path: str, uids: list[str]) -> dict[str, np.ndarray]:
    """Exact token confidence of each uid from an ``answer_confidence.py`` cache (NaN where absent)."""
    with open(path) as fh:
        cache = json.load(fh)
    stat = cache["statistics"][0]
    return {
        f"token confidence, exact ({stat})": np.array(
            [cache["scores"].get(u, [np.nan])[0] for u in uids], dtype=np.float64
        )
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    store_arguments(p)
    p.add_argument("--compare", nargs="+", required=True, help="JSON reports of flowcheck compare --max-eval")
    a = p.parse_args()
    torch.set_num_threads(1)
    feats, labels, uids = load_parts(a.parts)
    index = {u: i for i, u in enumerate(uids)}
    split = split_records(uids, seed=a.split_seed)
    tr = np.array([index[u] for u in split.train])
    va = np.array([index[u] for u in split.validation])
    y_all = labels.numpy()
    own: dict[str, np.ndarray] = {}
    for folder in a.validator:
        v = FlowValidator.from_pretrained(folder)
        own[f"validator {folder.rstrip('/').split('/')[-1]}"] = (
            v.score_features(feats.select(v.config.feature_names)).scores.double().numpy()
        )
    own.update(probe_scores(feats, y_all, tr, va))
    if a.confidence:
        own.update(confidence_scores(a.confidence, uids))
    report: dict = {"split_seed": a.split_seed, "subsets": {}}
    for path in a.compare:
        with open(path) as fh:
            cmp = json.load(fh)
        test_uids = cmp["uids"]["test"]
        y = np.array(cmp["labels"]["test"], dtype=np.int64)
        idx = np.array([index[u] for u in test_uids])
        assert np.array_equal(y_all[idx], y), f"{path}: labels differ from the store's"
        rows, costly = {}, {}
        for name, scores in cmp["scores"].items():
            s = np.asarray(scores["test"], dtype=np.float64)
            if np.isnan(s).any():
                continue
            rows[name] = _row(y, s)
            costly[name] = s
        for name, s_all in own.items():
            s = s_all[idx]
            ok = ~np.isnan(s)
            rows[name] = _row(y[ok], s[ok])
            if ok.all() and name.startswith("validator"):
                for cname, cs in costly.items():
                    rows[name][f"minus {cname}"] = paired_difference(y, s, cs)
        report["subsets"][path] = {"n": len(y), "positives": int(y.sum()), "caps": cmp.get("caps"), "rows": rows}
        print(f"\n{path}: {len(y)} test answers ({int(y.sum())} hallucinated)", file=sys.stderr)
        for name, r in rows.items():
            extra = {k: [round(x, 3) for x in v] for k, v in r.items() if k.startswith("minus")}
            print(f"  {name}: {r['auroc']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] {extra or ''}", file=sys.stderr)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
