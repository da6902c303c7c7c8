"""Is there signal in the flow features themselves? A pooled logistic-regression check.

Not the spec's validator: each answer's events are pooled (mean and max of every feature over
its valid events, plus log answer length), standardized on the train split, and scored with an
L2-regularized logistic regression fitted on the train split. Same seeded split as
``flowcheck train``; test-split AUROC with a 95% bootstrap interval, plus every single pooled
feature's AUROC (direction as measured) and the answer-length-only baseline.

Run: ``python benchmarks/pooled_flow_probe.py --features runs/qa-gen-normalized``
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def pooled(store, uids):
    f, y, _ = store.load(uids)
    m = f.valid.float()
    has = m.flatten(1).sum(1) > 0
    cnt = m.sum((1, 2)).clamp_min(1)
    mean = (f.values * m[..., None]).sum((1, 2)) / cnt[:, None]
    mx = f.values.masked_fill(~f.valid[..., None], -1e9).amax((1, 2))
    ntok = (f.positions >= 0).sum(1).float()
    x = torch.cat([mean, mx, torch.log1p(ntok)[:, None]], 1)[has]
    return x.numpy().astype(np.float64), y[has].numpy(), ntok[has].numpy()


def fit_logistic(x, y, l2=1e-2):
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), float(b.detach())


def probe_rows(store, *, split_seed: int = 0, n_bootstrap: int = 1000, drop_uids=None) -> dict:
    """Fit the pooled probe on the train split; test rows (probe, length), single-feature AUROCs.

    ``drop_uids`` leaves records out after splitting (see ``train_from_store``).
    """
    from hf_flowcheck.data.splits import split_records
    from hf_flowcheck.metrics import auroc, evaluate_scores

    _, _, uids = store.load()
    split = split_records(uids, seed=split_seed)
    if drop_uids is not None:
        split = split.without(drop_uids)
    xtr, ytr, _ = pooled(store, split.train)
    xva, yva, _ = pooled(store, split.validation)
    xte, yte, nte = pooled(store, split.test)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    w, b = fit_logistic((xtr - mu) / sd, ytr)

    def score(x):
        return (x - mu) / sd @ w + b

    rows = {
        "pooled flow features + logistic regression": evaluate_scores(yte, score(xte), n_bootstrap=n_bootstrap),
        "answer length (tokens)": evaluate_scores(yte, nte, n_bootstrap=n_bootstrap),
    }
    names = list(store.feature_names)
    single = {
        n: {"mean": float(auroc(yte, xte[:, i])), "max": float(auroc(yte, xte[:, len(names) + i]))}
        for i, n in enumerate(names)
    }
    return {
        "rows": rows,
        "single": single,
        "validation_auroc": float(auroc(yva, score(xva))),
        "sizes": {"train": len(ytr), "validation": len(yva), "test": len(yte)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from hf_flowcheck.metrics import format_table
    from hf_flowcheck.workflows.store import FeatureStore

    res = probe_rows(FeatureStore.open(args.features), split_seed=args.split_seed, n_bootstrap=args.bootstrap)
    n = res["sizes"]
    print(f"{args.features}: train {n['train']}, validation {n['validation']}, test {n['test']} answers with events")
    print(f"validation AUROC of the pooled probe: {res['validation_auroc']:.3f}")
    print(format_table(res["rows"], metrics=["auroc", "auprc", "precision_at_recall_0.8"]))
    print("single pooled features, test AUROC (mean over events / max over events):")
    for name, v in res["single"].items():
        print(f"  {name:16s} {v['mean']:.3f} / {v['max']:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)


if __name__ == "__main__":
    main()
