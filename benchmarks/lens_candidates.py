"""Lens channels within a candidate set (``FlowConfig.lens_candidates``) against the exact ones.

For every replayed answer of a store, re-captures the residual states teacher-forced (one forward,
no spec signatures) and computes the four lens channels with ``lens_candidates=K``. Reports:

* the error against the exact channels stored in the part stores (max and median relative error
  per channel, Pearson correlation), after checking on the first answers that the exact channels
  recomputed here equal the stored ones (same tokens, same states);
* the cost of the lens channels per answer, exact vs candidates (alternating, same answers);
* detection on the store's seed-0 grouped split: the same validator designs trained on the stored
  features and on the features with the candidate lens channels swapped in, test AUROC with
  95% intervals (the choice of ``K`` is not tuned on test: one ``K`` per run).

Run: ``python benchmarks/lens_candidates.py --parts runs/replay/smol-qa \
--answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl --candidates 64 --out runs/lens-candidates-64.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from validator_selection import VARIANTS, run_variant

from hf_flowcheck.capture import FlowRecorder
from hf_flowcheck.configuration import LENS_FEATURES, FlowConfig
from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.detectors.baselines import HiddenStateProbe
from hf_flowcheck.extraction import FlowExtractor, FlowFeatures
from hf_flowcheck.metrics import evaluate_scores
from hf_flowcheck.readout import lens_features
from hf_flowcheck.workflows.answers import read_answers
from hf_flowcheck.workflows.replay import load_parts


def states_after_blocks(ext: FlowExtractor, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """``[R, B, d]`` residual after each block at the answer tokens (teacher-forced, as the replay)."""
    ids = torch.tensor([prompt_ids + gen_ids])
    att = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[0, len(prompt_ids) :] = 1
    mask = ext.token_mask(ids, att, resp)
    r_idx, cols = mask.nonzero(as_tuple=True)

    def selector(call: int, batch: int, seq: int, device: torch.device):
        return (r_idx, cols, cols) if call == 0 else None

    with FlowRecorder(ext.arch, selector, capacity=r_idx.numel()) as rec:
        ext.forward(ids, att)
        states = rec.result()
    return states.r[:, 1:].float()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--answers", required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--variants", nargs="+", default=["attn-flow+lens", "attn-flow+lens+state3@probe"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--timing", type=int, default=40, help="answers timed (alternating exact and candidates)")
    p.add_argument(
        "--limit", type=int, default=None, help="only the first LIMIT answers (errors and timing; no training)"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)

    from hf_flowcheck.offline_models import load_model

    model, tok = load_model(a.model)
    model.eval()
    cfg = FlowConfig(lens_features=True, lens_candidates=a.candidates)
    ext = FlowExtractor(model, cfg)
    norm, readout = ext.norms[-1], ext.readout
    feats, labels, uids = load_parts(a.parts)
    if a.limit:
        keep = np.arange(min(a.limit, len(uids)))
        feats = FlowFeatures(
            feats.values[keep], feats.valid[keep], feats.positions[keep], feats.names,
            [feats.sample_keys[i] for i in keep], states=feats.states[keep] if feats.states is not None else None,
        )  # fmt: skip
        labels, uids, a.variants = labels[keep], uids[: len(keep)], []
    recs = {r.uid: r for r in read_answers(a.answers).records}
    lens_idx = [feats.names.index(n) for n in LENS_FEATURES]
    swapped = feats.values.clone()
    times = {"exact": [], "candidates": []}
    t_start = time.perf_counter()
    with torch.no_grad():
        for i, uid in enumerate(uids):
            rec = recs[uid]
            r_after = states_after_blocks(ext, encode_text(tok, rec.prompt), list(rec.gen_ids))
            n_tok = int(feats.valid[i, 0].sum())
            if r_after.shape[0] != n_tok:
                raise RuntimeError(f"{uid}: {r_after.shape[0]} answer tokens here, {n_tok} in the store")
            t0 = time.perf_counter()
            cand = lens_features(r_after, norm, readout, cfg.num_competitors, a.candidates)  # [B, R, 4]
            t1 = time.perf_counter()
            if i < a.timing:
                exact = lens_features(r_after, norm, readout, cfg.num_competitors, 0)
                times["candidates"].append(t1 - t0)
                times["exact"].append(time.perf_counter() - t1)
                stored = feats.values[i, :, :n_tok][..., lens_idx]
                if i < 5 and not torch.allclose(exact, stored, rtol=1e-3, atol=1e-4):
                    raise RuntimeError(f"{uid}: the exact lens channels recomputed here differ from the store's")
            swapped[i, :, :n_tok, lens_idx[0] : lens_idx[-1] + 1] = cand
            if i % 500 == 0:
                print(f"{i}/{len(uids)} answers, {time.perf_counter() - t_start:.0f} s", file=sys.stderr)

    v = feats.valid
    report: dict = {"candidates": a.candidates, "n": len(uids), "channels": {}}
    for j, name in zip(lens_idx, LENS_FEATURES):
        x, y = feats.values[..., j][v].double(), swapped[..., j][v].double()
        rel = (y - x).abs() / x.abs().clamp_min(1e-6)
        report["channels"][name] = {
            "max_abs_error": float((y - x).abs().max()),
            "max_rel_error": float(rel.max()),
            "median_rel_error": float(rel.median()),
            "pearson": float(np.corrcoef(x.numpy(), y.numpy())[0, 1]),
        }
        print(f"{name}: {report['channels'][name]}", file=sys.stderr)
    report["lens_seconds_per_answer"] = {k: float(np.median(t)) for k, t in times.items()}
    print(f"lens time per answer: {report['lens_seconds_per_answer']}", file=sys.stderr)
    if not a.variants:
        Path(a.out).write_text(json.dumps(report, indent=1))
        return 0

    y = labels.numpy()
    has = feats.valid.reshape(len(feats), -1).any(1).numpy()
    index = {u: i for i, u in enumerate(uids)}
    split = split_records(uids, seed=0)
    tr, va, te = (np.array([index[u] for u in split[n] if has[index[u]]]) for n in ("train", "validation", "test"))
    probe = HiddenStateProbe(kind="logistic", l2=1e-2).fit(feats.states[tr], y[tr], feats.states[va], y[va])
    layer = int(probe.layer)
    cand_feats = FlowFeatures(
        swapped, feats.valid, feats.positions, feats.names, feats.sample_keys, states=feats.states
    )
    report["rows"] = {}
    for name in a.variants:
        for which, f in (("exact", feats), (f"candidates K={a.candidates}", cand_feats)):
            _, s_te, info = run_variant(name, VARIANTS[name], f, y, tr, va, te, layer, 0, a.epochs)
            m = evaluate_scores(y[te], s_te, name=name, n_bootstrap=1000, seed=0)["metrics"]["auroc"]
            row = {"test_auroc": m["value"], "test_ci": [m["low"], m["high"]], "best_epoch": info["best_epoch"]}
            report["rows"][f"{name} ({which})"] = row
            print(f"{name} ({which}): {row}", file=sys.stderr)
            Path(a.out).write_text(json.dumps(report, indent=1))
    Path(a.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
