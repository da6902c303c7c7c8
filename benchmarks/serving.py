"""Throughput of a mixed request load on one wrapper: one caller in turn against N threads at once.

Every ``generate`` of a :class:`~hf_flowcheck.FlowCheckedModelForCausalLM` holds the base model's
lock (plain calls included), so N threads get the results they would get alone, one call at a
time. This prints what that costs: requests per second with N threads over requests per second of
the same requests issued one after another, in the same process, alternating the two orders.

    python benchmarks/serving.py --threads 8 --requests 16 --reps 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowTextStreamer
from hf_flowcheck.cli.generation import DEMO_SAMPLES
from hf_flowcheck.data import Example, generation_prompt

KINDS = ("plain", "flow", "check", "stream")


def request(fc, kind: str, enc, new_tokens: int):
    kw = dict(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if kind == "plain":
        return fc.generate(**kw)
    if kind == "flow":
        return fc.generate(**kw, return_flow_scores=True)
    if kind == "check":
        return fc.generate(**kw, flow_check_every=4, flow_check_refit="doubling")
    return fc.generate(**kw, streamer=FlowTextStreamer(fc.tokenizer), flow_check_refit="doubling")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    fc = FlowCheckedModelForCausalLM.from_pretrained(args.model)
    tok = fc.tokenizer
    prompts = [
        generation_prompt(Example("s", "qa", {"knowledge": c, "question": q}))
        for q, c, _, style in DEMO_SAMPLES
        if style == "plain-fewshot"  # the demo's HaluEval-QA questions with their passages
    ]
    encs = [tok(p, return_tensors="pt") for p in prompts]
    jobs = [(KINDS[i % len(KINDS)], encs[i % len(encs)]) for i in range(args.requests)]
    for kind in KINDS:  # warm-up: token tables, fingerprints and first-call set-up are not in the timings
        request(fc, kind, encs[0], 2)

    def sequential() -> float:
        t0 = time.perf_counter()
        for kind, enc in jobs:
            request(fc, kind, enc, args.new_tokens)
        return time.perf_counter() - t0

    def threaded() -> float:
        barrier = threading.Barrier(args.threads)

        def worker(w: int) -> None:
            barrier.wait()
            for i in range(w, len(jobs), args.threads):
                request(fc, jobs[i][0], jobs[i][1], args.new_tokens)

        ts = [threading.Thread(target=worker, args=(w,)) for w in range(args.threads)]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return time.perf_counter() - t0

    seq, thr = [], []
    for r in range(args.reps):
        order = (sequential, threaded) if r % 2 == 0 else (threaded, sequential)
        for fn in order:
            (seq if fn is sequential else thr).append(fn())
    s, t = statistics.median(seq), statistics.median(thr)
    print(f"{args.requests} mixed requests ({', '.join(KINDS)}), {args.new_tokens} new tokens each, {args.model}")
    print(f"one caller in turn: {args.requests / s:.2f} req/s (median of {args.reps}: {s:.1f} s)")
    print(f"{args.threads} threads at once: {args.requests / t:.2f} req/s (median of {args.reps}: {t:.1f} s)")
    print(f"throughput ratio threads / in turn: {s / t:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
