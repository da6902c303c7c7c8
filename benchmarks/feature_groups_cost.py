"""Extra cost of the feature groups a validator can read, as ratios measured in one run.

``FlowExtractor.generate`` with the spec's features, with the readout-lens group
(``lens_features``: one full-vocabulary readout per answer token and block) and with the lens group
plus the last-token state summary (what the shipped flow + state validator reads), each against
plain ``model.generate`` on the same HaluEval-QA prompts (2-shot, greedy, 32 new tokens). Runs
alternate plain and flow modes; medians are reported.

    python benchmarks/feature_groups_cost.py --reps 3 --batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_flowcheck import FlowConfig, FlowExtractor
from hf_flowcheck.data import generation_prompt, load_halueval_qa
from hf_flowcheck.offline_models import load_model

MODES = {
    "spec features": FlowConfig(),
    "+ lens": FlowConfig(lens_features=True),
    "+ lens + state": FlowConfig(lens_features=True, state_summary="last"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(a.model)
    tok.padding_side = "left"
    records = load_halueval_qa(limit=a.prompts * a.batch + 10)[10:]
    prompts = [generation_prompt(r) for r in records][: a.prompts * a.batch]
    batches = [
        tok(prompts[i : i + a.batch], return_tensors="pt", padding=True) for i in range(0, len(prompts), a.batch)
    ]
    kw = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    exts = {name: FlowExtractor(model, cfg, tokenizer=tok) for name, cfg in MODES.items()}
    times: dict[str, list[float]] = {"plain": [], **{n: [] for n in MODES}}
    for rep in range(a.reps + 1):  # the first round warms up and is dropped
        for enc in batches:
            for mode in times:
                t0 = time.perf_counter()
                with torch.no_grad():
                    if mode == "plain":
                        model.generate(**enc, **kw)
                    else:
                        exts[mode].generate(enc.input_ids, attention_mask=enc.attention_mask, **kw)
                if rep:
                    times[mode].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {
        "model": a.model,
        "batch": a.batch,
        "new_tokens": a.new_tokens,
        "median_seconds": med,
        "ratio_to_plain": {m: med[m] / med["plain"] for m in MODES},
    }
    for m in MODES:
        print(f"{m:16s} {med[m]:.3f} s  {out['ratio_to_plain'][m]:.2f}x plain generate ({med['plain']:.3f} s)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
