"""`FlowConfig(basis_solver="subspace")` against the default eigensolve, on real answers.

Teacher-forces the first ``--limit`` answers of a committed answers file through the model twice,
with ``basis_solver="eigh"`` (the spec's default) and ``"subspace"``, runs alternating, and reports:

- the feature differences per channel: the largest absolute difference, and the largest and median
  relative difference ``|a - b| / (|a| + 1e-3)`` over every valid event;
- the largest difference of the bundled validator's answer score (the same weights on both);
- the extraction time of each, and their ratio (one thread).

Run: ``python benchmarks/basis_solver.py --answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl
--model SmolLM2-135M-Instruct --limit 60 --out runs/basis-solver.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.workflows.answers import read_answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--validator", default=None, help="default: the model's bundled validator")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    kw = {} if a.validator is None else {"validator": a.validator}
    fc = FlowCheckedModelForCausalLM.from_pretrained(a.model, **kw)
    v, tok = fc.validator, fc.tokenizer
    cfg = v.flow_config
    ext = {s: FlowExtractor(fc.base_model, dataclasses.replace(cfg, basis_solver=s)) for s in ("eigh", "subspace")}
    recs = [r for r in read_answers(a.answers).records if r.gen_ids][: a.limit]
    seconds = {s: 0.0 for s in ext}
    abs_d, rel_d, score_d = [], [], []
    for rec in recs:
        prompt = encode_text(tok, rec.prompt)
        ids = torch.tensor([prompt + list(rec.gen_ids)])
        resp = torch.zeros_like(ids)
        resp[:, len(prompt) :] = 1
        feats = {}
        for s, e in ext.items():
            t0 = time.perf_counter()
            feats[s] = e.extract(ids, response_mask=resp)
            seconds[s] += time.perf_counter() - t0
        x, y = feats["eigh"], feats["subspace"]
        m = x.valid
        if not bool(m.any()):
            continue
        d = (x.values[m] - y.values[m]).abs()
        abs_d.append(d.amax(0))
        rel_d.append(d / (x.values[m].abs() + 1e-3))
        s_x = v.score_features(x.select(v.config.feature_names)).scores
        s_y = v.score_features(y.select(v.config.feature_names)).scores
        score_d.append(float((s_x - s_y).abs().max()))
    rel = torch.cat(rel_d)
    names = list(cfg.feature_names)
    report = {
        "answers": len(score_d),
        "events": int(rel.shape[0]),
        "per_channel": {
            n: {
                "max_abs": float(torch.stack(abs_d)[:, j].max()),
                "max_rel": float(rel[:, j].max()),
                "median_rel": float(rel[:, j].median()),
            }
            for j, n in enumerate(names)
        },
        "max_score_difference": max(score_d),
        "seconds": seconds,
        "ratio_subspace_to_eigh": seconds["subspace"] / seconds["eigh"],
        "threads": a.threads,
    }
    print(json.dumps(report, indent=1))
    print(
        f"{len(score_d)} answers: max |score difference| {max(score_d):.2e}; median relative feature difference "
        f"{float(np.median(rel.numpy())):.2e}; extraction {seconds['eigh']:.1f} s (eigh) vs "
        f"{seconds['subspace']:.1f} s (subspace), ratio {report['ratio_subspace_to_eigh']:.2f}"
    )
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
