"""Token confidence on one split of a replayed answers set, with every metric and its 95% interval.

python benchmarks/confidence_on_split.py --parts runs/replay/smol-qa --confidence runs/confidence-smol-qa.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.metrics import evaluate_scores, format_table
from hf_flowcheck.workflows.replay import PartedStore


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", required=True)
    p.add_argument("--confidence", required=True, help="JSON from benchmarks/answer_confidence.py")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    store = PartedStore(a.parts)
    split = split_records(store.uids(), seed=a.split_seed)
    feats, labels, uids = store.load(split[a.split])
    has = feats.valid.reshape(len(feats), -1).any(1).numpy()  # the rows every flow detector scores
    with open(a.confidence) as fh:
        cache = json.load(fh)
    rows = {}
    for j, stat in enumerate(cache["statistics"]):
        col = np.array([cache["scores"].get(u, [np.nan] * 4)[j] for u in uids], dtype=np.float64)
        ok = has & ~np.isnan(col)
        if (has & np.isnan(col)).any():
            raise SystemExit(f"{int((has & np.isnan(col)).sum())} rows lack a confidence score; run answer_confidence")
        rows[f"token confidence ({stat})"] = evaluate_scores(labels.numpy()[ok], col[ok], name=stat)
    print(format_table(rows))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
