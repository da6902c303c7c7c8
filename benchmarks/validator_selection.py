"""Choose the validator design on the validation split; report it on the test split, over several splits.

Reads replayed part stores (``hf_flowcheck.workflows.replay``; features with lens channels and
last-token state summaries), trains each variant on the train split, keeps the epoch with the best
validation loss, and prints validation and test AUROC per grouped split seed, their mean and
standard deviation, and the seed-0 test interval. Baselines on the same rows: the hidden-state probe
(layer chosen on validation, from the same state summaries), a logistic regression on pooled flow
features, the final readout's confidence and answer length. The design with the best mean
validation AUROC is the one to ship; the test columns are never used for a choice.

    python benchmarks/validator_selection.py --parts runs/replay/smol-qa --out runs/selection-smol-qa.json
    python benchmarks/validator_selection.py --merge seed0.json seed12.json merged.json   # seeds run in parallel
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from hf_flowcheck.configuration import FULL_FEATURES, LENS_FEATURES
from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import ValidatorConfig
from hf_flowcheck.detectors.baselines import (
    HiddenStateProbe,
    final_readout_confidence,
    pooled_flow_features,
    train_logistic_regression,
)
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.metrics import auroc, evaluate_scores
from hf_flowcheck.workflows.replay import load_parts
from hf_flowcheck.workflows.training import train_validator

FLOW = FULL_FEATURES
LENS = LENS_FEATURES


def channels(feats: FlowFeatures, names: tuple[str, ...]) -> FlowFeatures:
    return feats.select(names)


def rows(feats: FlowFeatures, idx: np.ndarray) -> FlowFeatures:
    return feats.take(idx)


def logistic(xtr, ytr, xs: list[torch.Tensor], l2: float = 1e-2) -> list[np.ndarray]:
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    w, b = train_logistic_regression((xtr - mu) / sd, torch.as_tensor(ytr), l2=l2)
    return [(((x - mu) / sd).double() @ w + b).numpy() for x in xs]


VARIANTS = {
    # the spec's B.9 as it was bundled: raw inputs, LayerNorm across an event, GRU, max pooling
    "spec-gru": dict(names=FLOW, cfg=dict(head="gru", input_transform="none", event_layernorm=True), epochs=15),
    "gru+block-std+depth": dict(
        names=FLOW,
        cfg=dict(
            head="gru",
            input_transform="block_log_standardize",
            block_embedding=8,
            event_layernorm=False,
            hidden=64,
            embed=32,
            gru_hidden=32,
        ),
        epochs=30,
    ),
    # the depth-summary head (per-block mean/max over tokens, a convolution over depth)
    "depth-flow": dict(names=FLOW, cfg=dict(head="depth")),
    "depth-flow+lens": dict(names=FLOW + LENS, cfg=dict(head="depth")),
    "depth-flow+lens+state": dict(names=FLOW + LENS, cfg=dict(head="depth"), state=True),
    "depth-flow+state3@frozen-probe": dict(names=FLOW, cfg=dict(head="depth"), state=3, state_init="frozen-probe"),
    "attn-flow": dict(names=FLOW, cfg={}),
    # ensembles of five independently initialised heads, trained together on their mean logit
    "attn-flow-x5": dict(names=FLOW, cfg=dict(members=5)),
    "attn-flow+lens+state-x5": dict(names=FLOW + LENS, cfg=dict(members=5), state=True),
    "attn-flow+lens": dict(names=FLOW + LENS, cfg={}),
    "attn-lens": dict(names=LENS, cfg={}),
    "attn-flow+state": dict(names=FLOW, cfg={}, state=True),
    "attn-flow+lens+state": dict(names=FLOW + LENS, cfg={}, state=True),
    "attn-flow+lens+state3": dict(names=FLOW + LENS, cfg={}, state=3),
    # the state branch starts at the probe (and the event head at zero): training must beat the probe on validation
    "attn-flow+lens+state@probe": dict(names=FLOW + LENS, cfg={}, state=True, state_init="probe"),
    "attn-flow+lens+state3@probe": dict(names=FLOW + LENS, cfg={}, state=3, state_init="probe"),
    # the probe stays as fitted; the flow part trains as a residual on top of it
    "attn-flow+lens+state3@frozen-probe": dict(names=FLOW + LENS, cfg={}, state=3, state_init="frozen-probe"),
    "attn-flow+state3@frozen-probe": dict(names=FLOW, cfg={}, state=3, state_init="frozen-probe"),
}
ATTN = dict(
    head="attention",
    input_transform="block_log_standardize",
    block_embedding=8,
    event_layernorm=False,
    hidden=64,
    embed=32,
    dropout=0.1,
)


def run_variant(name, spec, feats, y, tr, va, te, probe_layer, seed, epochs):
    f = channels(feats, spec["names"])
    kw = {**ATTN, **spec["cfg"]} if spec["cfg"].get("head") != "gru" else dict(spec["cfg"])
    if kw.get("input_transform") == "block_log_standardize" or kw.get("block_embedding"):
        kw["num_blocks"] = f.num_blocks
    if spec.get("state"):
        n_bound = f.states.shape[1]
        around = (probe_layer,) if spec["state"] is True else (probe_layer - 4, probe_layer, probe_layer + 4)
        blocks = tuple(sorted({min(max(b, 0), n_bound - 1) for b in around}))
        kw.update(state_dim=f.states.shape[-1], state_blocks=blocks)
    cfg = ValidatorConfig.from_feature_names(f.names, **kw)
    t0 = time.perf_counter()
    model, hist = train_validator(
        rows(f, tr),
        y[tr],
        rows(f, va),
        y[va],
        config=cfg,
        lr=1e-3,
        epochs=spec.get("epochs", epochs),
        patience=10,
        batch_size=32,
        seed=seed,
        progress=False,
        selection="val_loss",
        state_init=spec.get("state_init", "random"),
    )
    s_va = model.score_features(rows(f, va)).logits.double().numpy()
    s_te = model.score_features(rows(f, te)).logits.double().numpy()
    return (
        s_va,
        s_te,
        {
            "best_epoch": hist.best_epoch,
            "epochs": hist.epochs_run,
            "seconds": time.perf_counter() - t0,
            "history": hist.to_dict(),
        },
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", required=True, help="root of the replayed part stores")
    p.add_argument("--out", required=True, help="JSON results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--gru-seeds", type=int, nargs="*", default=[0], help="split seeds on which GRU variants run")
    p.add_argument("--gru-epochs", type=int, default=None, help="cap the GRU variants' epochs (recorded)")
    p.add_argument("--train-sizes", type=int, nargs="*", default=[], help="learning curve of --curve-variant")
    p.add_argument("--curve-variant", default="attn-flow+lens+state")
    p.add_argument("--confidence", default=None, help="JSON from benchmarks/answer_confidence.py")
    a = p.parse_args()
    torch.set_num_threads(1)
    feats, labels, uids = load_parts(a.parts)
    conf_cache = None
    if a.confidence:
        with open(a.confidence) as fh:
            conf_cache = json.load(fh)
    y = labels.numpy()
    has = feats.valid.reshape(len(feats), -1).any(1).numpy()
    print(f"{len(uids)} answers ({int(y.sum())} hallucinated, {int((~has).sum())} without events)", file=sys.stderr)
    index = {u: i for i, u in enumerate(uids)}
    results: dict = {"n": len(uids), "positives": int(y.sum()), "seeds": {}, "parts": a.parts}
    for seed in a.seeds:
        split = split_records(uids, seed=seed)
        tr, va, te = (np.array([index[u] for u in split[n] if has[index[u]]]) for n in ("train", "validation", "test"))
        res: dict = {"sizes": [len(tr), len(va), len(te)], "rows": {}, "test_uids": [uids[i] for i in te]}
        probe = HiddenStateProbe(kind="logistic", l2=1e-2).fit(feats.states[tr], y[tr], feats.states[va], y[va])
        layer = int(probe.layer)

        def add(name, s_va, s_te, *, va=va, te=te, res=res, seed=seed, **extra):
            ok_va, ok_te = ~np.isnan(s_va), ~np.isnan(s_te)
            row = {
                # Token confidence is cached for test rows only (--test-of-seeds): no validation AUROC then.
                "val_auroc": auroc(y[va][ok_va], s_va[ok_va]) if ok_va.any() else float("nan"),
                "test_auroc": auroc(y[te][ok_te], s_te[ok_te]),
                "test_missing": int((~ok_te).sum()),
                **extra,
            }
            if seed == a.seeds[0]:
                full = evaluate_scores(y[te][ok_te], s_te[ok_te], name=name, n_bootstrap=1000, seed=0)
                row["test_metrics"] = full
                row["test_ci"] = [full["metrics"]["auroc"]["low"], full["metrics"]["auroc"]["high"]]
                row["test_scores"] = [float(x) for x in s_te]  # for paired comparisons across stores
            res["rows"][name] = row
            print(f"seed {seed} {name:24s} val {row['val_auroc']:.3f} test {row['test_auroc']:.3f}", file=sys.stderr)

        add("hidden-state probe", probe.score(feats.states[va]), probe.score(feats.states[te]), layer=layer)
        # the same probe over the three depths the state3 variants read (layer - 4, layer, layer + 4)
        three = sorted({min(max(b, 0), feats.states.shape[1] - 1) for b in (layer - 4, layer, layer + 4)})
        flat = feats.states[:, three].reshape(len(feats), -1)
        add("hidden-state probe (3 depths)", *logistic(flat[tr], y[tr], [flat[va], flat[te]]), layers=three)
        s = logistic(
            pooled_flow_features(channels(feats, FLOW))[tr],
            y[tr],
            [pooled_flow_features(channels(feats, FLOW))[va], pooled_flow_features(channels(feats, FLOW))[te]],
        )
        add("pooled flow + LR", *s)
        conf = final_readout_confidence(feats)
        if conf is not None:
            add("final-readout confidence", conf[va].numpy(), conf[te].numpy())
        length = feats.valid[:, 0].sum(-1).double().numpy()
        add("answer length", length[va], length[te])
        if conf_cache:
            for j, stat in enumerate(conf_cache["statistics"][:2]):
                col = np.array([conf_cache["scores"].get(u, [np.nan] * 4)[j] for u in uids], dtype=np.float64)
                add(f"token confidence ({stat})", col[va], col[te])
        for name in a.variants:
            if VARIANTS[name]["cfg"].get("head") == "gru" and seed not in a.gru_seeds:
                continue  # the GRUs are ~30x slower to train; they run on --gru-seeds only
            spec = VARIANTS[name]
            if spec["cfg"].get("head") == "gru" and a.gru_epochs is not None:
                spec = {**spec, "epochs": a.gru_epochs}
            s_va, s_te, info = run_variant(name, spec, feats, y, tr, va, te, layer, seed, a.epochs)
            add(name, s_va, s_te, **info)
        results["seeds"][seed] = res
        if seed == a.seeds[0] and a.train_sizes:
            curve = {}
            for n in [*a.train_sizes, len(tr)]:
                sub = tr[: min(n, len(tr))]
                s_va, s_te, info = run_variant(
                    a.curve_variant, VARIANTS[a.curve_variant], feats, y, sub, va, te, layer, seed, a.epochs
                )
                pr = HiddenStateProbe(kind="logistic", l2=1e-2).fit(feats.states[sub], y[sub], feats.states[va], y[va])
                curve[len(sub)] = {
                    "val_auroc": auroc(y[va], s_va),
                    "test_auroc": auroc(y[te], s_te),
                    "probe_test_auroc": auroc(y[te], pr.score(feats.states[te])),
                }
                print(f"curve n={len(sub)} {curve[len(sub)]}", file=sys.stderr)
            results["learning_curve"] = {"variant": a.curve_variant, "points": curve}
        with open(a.out, "w") as fh:
            json.dump(results, fh, indent=1, default=float)
    return summarize(results, a.variants, a.out)


def summarize(results: dict, variants: list[str], out: str) -> int:
    """Print the table (mean ± sd over split seeds, seed-0 interval) and the validation choice."""
    seeds = sorted(results["seeds"], key=int)
    first = results["seeds"][seeds[0]]
    names = list(first["rows"])
    print("| detector | val AUROC (mean ± sd) | test AUROC (mean ± sd) (splits) | seed-0 test [95% CI] |")
    print("|---|---|---|---|")
    summary = {}
    for name in names:
        ran = [s for s in seeds if name in results["seeds"][s]["rows"]]
        v = [results["seeds"][s]["rows"][name]["val_auroc"] for s in ran]
        t = [results["seeds"][s]["rows"][name]["test_auroc"] for s in ran]
        r0 = first["rows"][name]
        summary[name] = {"val_mean": float(np.mean(v)), "test_mean": float(np.mean(t)), "splits": len(ran)}
        print(
            f"| {name} | {np.mean(v):.3f} ± {np.std(v):.3f} | {np.mean(t):.3f} ± {np.std(t):.3f} ({len(ran)}) | "
            f"{r0['test_auroc']:.3f} [{r0['test_ci'][0]:.3f}, {r0['test_ci'][1]:.3f}] |"
        )
    candidates = [n for n in variants if n in summary]
    best = max(candidates, key=lambda n: summary[n]["val_mean"])
    results["summary"], results["chosen_on_validation"] = summary, best
    print(f"\nchosen on validation: {best}")
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    return 0 if all(math.isfinite(s["val_mean"]) for s in summary.values()) else 1


def merge(paths: list[str], out: str) -> int:
    """Merge runs over different split seeds (run in parallel) into one table."""
    merged: dict = {}
    for path in paths:
        with open(path) as fh:
            part = json.load(fh)
        seeds = merged.setdefault("seeds", {})
        seeds.update(part.pop("seeds"))
        for k, v in part.items():
            if k not in ("summary", "chosen_on_validation"):
                merged.setdefault(k, v)
    return summarize(merged, list(VARIANTS), out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        raise SystemExit(merge(sys.argv[2:-1], sys.argv[-1]))
    raise SystemExit(main())
