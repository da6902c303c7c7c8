"""Transfer without retraining: detectors fitted on HaluEval-QA, scored on another answers set.

Each validator folder is scored as it is; the hidden-state probe is fitted on the QA train split
(layer chosen on the QA validation split) from the same state summaries; token confidence needs no
training. Every detector is scored on all answers of the transfer set that have flow events.

    python benchmarks/transfer.py --qa-parts runs/replay/smol-qa --eval-parts runs/replay/smol-selfaware \
        --validator hf_flowcheck/bundled/validators/smollm2-135m-instruct-halueval-qa \
        --validator runs/train/smol-flow-only --confidence runs/confidence-smol-selfaware.json --name SelfAware
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.baselines import HiddenStateProbe, final_readout_confidence
from hf_flowcheck.metrics import evaluate_scores, format_table
from hf_flowcheck.workflows.replay import load_parts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qa-parts", required=True, help="replayed QA answers (the probe's training data)")
    p.add_argument("--eval-parts", required=True, help="replayed answers of the transfer set")
    p.add_argument("--validator", action="append", default=[], help="validator folder (repeatable)")
    p.add_argument("--confidence", default=None, help="JSON from benchmarks/answer_confidence.py for the set")
    p.add_argument("--name", default="transfer")
    p.add_argument("--out", default=None, help="JSON results")
    a = p.parse_args()
    qa, qy, quids = load_parts(a.qa_parts)
    split = split_records(quids, seed=0)
    index = {u: i for i, u in enumerate(quids)}
    tr = np.array([index[u] for u in split.train])
    va = np.array([index[u] for u in split.validation])
    probe = HiddenStateProbe(kind="logistic").fit(qa.states[tr], qy.numpy()[tr], qa.states[va], qy.numpy()[va])
    feats, labels, uids = load_parts(a.eval_parts)
    has = feats.valid.reshape(len(feats), -1).any(1).numpy()
    y = labels.numpy()[has]
    print(f"{a.name}: {int(has.sum())} answers with events ({int(y.sum())} positive)", file=sys.stderr)
    rows = {}
    for folder in a.validator:
        v = FlowValidator.from_pretrained(folder)
        names = v.config.feature_names
        sub = feats.select(names)
        s = v.score_features(sub).scores.double().numpy()[has]
        rows[f"validator {folder.rstrip('/').split('/')[-1]}"] = evaluate_scores(y, s, name=folder)
    rows[f"hidden-state probe (QA-fitted, layer {probe.layer})"] = evaluate_scores(
        y, probe.score(feats.states)[has], name="probe"
    )
    if a.confidence:
        with open(a.confidence) as fh:
            cache = json.load(fh)
        for j, stat in enumerate(cache["statistics"][:2]):
            col = np.array([cache["scores"].get(u, [np.nan] * 4)[j] for u in uids], dtype=np.float64)[has]
            ok = ~np.isnan(col)
            rows[f"token confidence ({stat})"] = evaluate_scores(y[ok], col[ok], name=stat)
    conf = final_readout_confidence(feats)
    if conf is not None:
        rows["final-readout confidence (-mean log p of the top token)"] = evaluate_scores(
            y, conf.double().numpy()[has], name="final-readout confidence"
        )
    length = feats.valid[:, 0].sum(-1).double().numpy()[has]
    rows["answer length"] = evaluate_scores(y, length, name="length")
    print(format_table(rows))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump({"name": a.name, "rows": rows}, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
