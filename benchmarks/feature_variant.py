"""A `FlowConfig` variant against the validator's own config, on real answers.

Teacher-forces the first ``--limit`` answers of a committed answers file through the model twice,
with the validator's ``FlowConfig`` (the reference) and with the fields of ``--set`` replaced (for
example ``basis_solver=subspace`` or ``competitor_candidates=256``), runs alternating, and reports:

- the feature differences per channel: the largest absolute difference, the largest and median
  relative difference ``|a - b| / (|a| + 1e-3)`` over every valid event, and the Pearson correlation;
- the median relative difference per block (approximations can differ by depth);
- the largest difference of the validator's answer score (the same weights on both; for a variant
  that changes the features, a validator would have to be retrained on them);
- the extraction time of each, and of the window fits alone (``fit_sample_bases``), with their ratios.

Run: ``python benchmarks/feature_variant.py --answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl
--model SmolLM2-135M-Instruct --set basis_solver=subspace --limit 60 --out runs/basis-solver.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from hf_flowcheck import FlowCheckedModelForCausalLM, extraction, signatures
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.workflows.answers import read_answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--validator", default=None, help="default: the model's bundled validator")
    p.add_argument("--set", nargs="+", default=["basis_solver=subspace"], help="FIELD=VALUE of the variant.")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kw = {} if a.validator is None else {"validator": a.validator}
    fc = FlowCheckedModelForCausalLM.from_pretrained(a.model, **kw)
    v, tok = fc.validator, fc.tokenizer
    cfg = v.flow_config
    changes = {}
    for item in a.set:
        key, _, raw = item.partition("=")
        kind = type(getattr(cfg, key))
        changes[key] = raw.lower() in ("1", "true") if kind is bool else kind(raw)
    variant = dataclasses.replace(cfg, **changes)
    ext = {"reference": FlowExtractor(fc.base_model, cfg), "variant": FlowExtractor(fc.base_model, variant)}
    recs = [r for r in read_answers(a.answers).records if r.gen_ids][: a.limit]
    seconds = {s: 0.0 for s in ext}
    fit_seconds = {s: 0.0 for s in ext}
    current = ["reference"]
    fit = signatures.fit_sample_bases

    def timed_fit(*args, **kwargs):  # the window bases alone: readout, competitor ranking, eigensolves
        t0 = time.perf_counter()
        out = fit(*args, **kwargs)
        fit_seconds[current[0]] += time.perf_counter() - t0
        return out

    signatures.fit_sample_bases = extraction.fit_sample_bases = timed_fit
    abs_d, rel_d, score_d, pairs, block_rel = [], [], [], [], []
    for rec in recs:
        prompt = encode_text(tok, rec.prompt)
        ids = torch.tensor([prompt + list(rec.gen_ids)])
        resp = torch.zeros_like(ids)
        resp[:, len(prompt) :] = 1
        feats = {}
        for s, e in ext.items():
            current[0] = s
            t0 = time.perf_counter()
            feats[s] = e.extract(ids, response_mask=resp)
            seconds[s] += time.perf_counter() - t0
        x, y = feats["reference"], feats["variant"]
        m = x.valid
        if not bool(m.any()):
            continue
        d = (x.values[m] - y.values[m]).abs()
        abs_d.append(d.amax(0))
        rel_d.append(d / (x.values[m].abs() + 1e-3))
        pairs.append((x.values[m], y.values[m]))
        # [B, T, F] per block: the median over its tokens and channels
        per_block = (x.values - y.values).abs() / (x.values.abs() + 1e-3)
        block_rel.append([float(per_block[0, b][m[0, b]].median()) for b in range(m.shape[1]) if bool(m[0, b].any())])
        s_x = v.score_features(x.select(v.config.feature_names)).scores
        s_y = v.score_features(y.select(v.config.feature_names)).scores
        score_d.append(float((s_x - s_y).abs().max()))
    rel = torch.cat(rel_d)
    xs, ys = torch.cat([p[0] for p in pairs]).double(), torch.cat([p[1] for p in pairs]).double()
    names = list(cfg.feature_names)
    depth = len(max(block_rel, key=len))
    report = {
        "variant": changes,
        "answers": len(score_d),
        "events": int(rel.shape[0]),
        "per_channel": {
            n: {
                "max_abs": float(torch.stack(abs_d)[:, j].max()),
                "max_rel": float(rel[:, j].max()),
                "median_rel": float(rel[:, j].median()),
                "pearson": float(np.corrcoef(xs[:, j].numpy(), ys[:, j].numpy())[0, 1]),
            }
            for j, n in enumerate(names)
        },
        "median_rel_per_block": [float(np.median([r[b] for r in block_rel if len(r) == depth])) for b in range(depth)],
        "max_score_difference": max(score_d),
        "seconds": seconds,
        "ratio_variant_to_reference": seconds["variant"] / seconds["reference"],
        "basis_fit_seconds": fit_seconds,
        "basis_fit_ratio": fit_seconds["variant"] / max(fit_seconds["reference"], 1e-9),
        "threads": a.threads,
    }
    print(json.dumps(report, indent=1))
    print(
        f"{len(score_d)} answers, {changes}: max |score difference| {max(score_d):.2e}; median relative feature "
        f"difference {float(np.median(rel.numpy())):.2e}; extraction {seconds['reference']:.1f} s (reference) vs "
        f"{seconds['variant']:.1f} s (variant), ratio {report['ratio_variant_to_reference']:.2f}; window bases "
        f"{fit_seconds['reference']:.1f} s vs {fit_seconds['variant']:.1f} s, ratio {report['basis_fit_ratio']:.2f}"
    )
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
