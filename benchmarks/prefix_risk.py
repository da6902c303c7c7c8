"""Running scores before the answer ends: a validator trained on answer prefixes vs on whole answers.

Trains the same flow + lens design (no state branch: a prefix has no last-token state in the store)
on the seed-0 grouped split twice — on whole answers, and with ``prefix_augment`` — and scores the
test answers cut after their first ``k`` tokens (``k`` = 1, 2, 4, 8 and the whole answer). Cutting
stored features approximates a streaming check: the window bases were fitted on the whole answer,
where a check with ``flow_check_refit="always"`` fits them on the prefix.

Per ``k``: test AUROC with its 95% interval, the mean running score of right and of hallucinated
answers, and the share of right answers a threshold of 0.5 would stop (false abstentions).

Run: ``python benchmarks/prefix_risk.py --parts runs/replay/smol-qa --out runs/prefix-risk.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from validator_selection import ATTN, FLOW, LENS, channels, rows

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import ValidatorConfig
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.metrics import evaluate_scores
from hf_flowcheck.workflows.replay import load_parts
from hf_flowcheck.workflows.training import train_validator


def cut(feats: FlowFeatures, k: int | None) -> FlowFeatures:
    """The first ``k`` tokens of every answer (all of them for ``None``)."""
    if k is None:
        return feats
    cols = torch.arange(feats.valid.shape[-1])
    valid = feats.valid & (cols[None, None, :] < k)
    return FlowFeatures(feats.values, valid, feats.positions, feats.names, feats.sample_keys, states=feats.states)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix-augment", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    a = p.parse_args()
    torch.set_num_threads(1)
    feats, labels, uids = load_parts(a.parts)
    feats = channels(feats, FLOW + LENS)
    y = labels.numpy()
    has = feats.valid.reshape(len(feats), -1).any(1).numpy()
    index = {u: i for i, u in enumerate(uids)}
    split = split_records(uids, seed=a.seed)
    tr, va, te = (np.array([index[u] for u in split[n] if has[index[u]]]) for n in ("train", "validation", "test"))
    kw = {**ATTN, "num_blocks": feats.num_blocks}
    cfg = ValidatorConfig.from_feature_names(feats.names, **kw)
    n_tok = feats.valid.any(1).sum(-1).numpy()
    report: dict = {"split_seed": a.seed, "sizes": [len(tr), len(va), len(te)], "test_tokens": {}, "rows": {}}
    report["test_tokens"] = {"median": float(np.median(n_tok[te])), "max": int(n_tok[te].max())}
    for name, p_aug in (("whole answers", 0.0), (f"prefixes (p={a.prefix_augment})", a.prefix_augment)):
        model, hist = train_validator(
            rows(feats, tr), y[tr], rows(feats, va), y[va], config=cfg, epochs=a.epochs, patience=10,
            batch_size=32, seed=0, progress=False, prefix_augment=p_aug,
        )  # fmt: skip
        test = rows(feats, te)
        out = {"best_epoch": hist.best_epoch, "at": {}}
        for k in (1, 2, 4, 8, None):
            s = model.score_features(cut(test, k)).scores.double().numpy()
            m = evaluate_scores(y[te], s, name=name, n_bootstrap=1000, seed=0)["metrics"]["auroc"]
            right, wrong = s[y[te] == 0], s[y[te] == 1]
            out["at"]["all" if k is None else str(k)] = {
                "auroc": m["value"],
                "ci": [m["low"], m["high"]],
                "mean_score_right": float(right.mean()),
                "mean_score_hallucinated": float(wrong.mean()),
                "right_stopped_at_0.5": float((right > 0.5).mean()),
                "hallucinated_stopped_at_0.5": float((wrong > 0.5).mean()),
            }
            print(f"{name} k={k}: {out['at']['all' if k is None else str(k)]}", file=sys.stderr)
        report["rows"][name] = out
        Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
