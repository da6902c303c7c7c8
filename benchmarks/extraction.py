"""Cost of flow capture during generation, as ratios measured in one run.

Compares ``FlowExtractor.generate`` (capture + signatures of the generated tokens) with plain
``model.generate`` on the same HaluEval-QA prompts (2-shot plain prompt, greedy, 32 new tokens),
at batch 1 and batch 8, on SmolLM2-135M-Instruct. Timings alternate plain/flow runs and report
medians, so machine noise hits both sides alike. Memory: the capture buffers (exact bytes) against
the bound ``R·(B+1)·3·d·4`` and the peak resident-set growth of each mode measured in a fresh
child process (sampled every 2 ms; the difference flow − plain is the extra memory).

Run: ``python benchmarks/extraction.py [--reps 3] [--batches 1 8] [--new-tokens 32]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _prompts(n: int, tokenizer):
    from hf_flowcheck.data import generation_prompt, load_halueval_qa

    records = load_halueval_qa(limit=n + 10)[10 : 10 + n]  # skip the few-shot records
    return [generation_prompt(r) for r in records]


def _setup(model_name: str):
    from hf_flowcheck.offline_models import load_model

    model, tok = load_model(model_name)
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def _encode(tok, prompts):
    return tok(prompts, return_tensors="pt", padding=True)


def _run(mode: str, model, tok, ext, enc, new_tokens: int):
    """One generation: ``(seconds, output ids, features or None, capture-buffer bytes)``."""
    from hf_flowcheck.capture import capture_sizes
    from hf_flowcheck.generation import capture_generate

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    t0 = time.perf_counter()
    if mode == "plain":
        with torch.no_grad():
            out = model.generate(**enc, **kw)
        feats, nbytes = None, 0
    else:
        with capture_sizes() as sizes:
            out, feats = capture_generate(ext, enc.input_ids, attention_mask=enc.attention_mask, **kw)
        nbytes = sum(sizes)
    return time.perf_counter() - t0, out, feats, nbytes


def child(args) -> None:
    """Peak resident-set growth of one mode during generation, in a fresh process.

    A thread samples the current RSS every 2 ms while the mode runs; the figure is the peak
    minus the RSS just before (model loading and warm-up are excluded). The allocator may reuse
    memory freed earlier, so this can only under-count, never over-count, what the mode needs.
    """
    from peak_rss import peak_rss_growth

    from hf_flowcheck import FlowConfig, FlowExtractor

    torch.set_num_threads(args.threads)
    model, tok = _setup(args.model)
    ext = FlowExtractor(model, FlowConfig(), tokenizer=tok)
    enc = _encode(tok, _prompts(args.batch, tok))
    _run(args.child, model, tok, ext, enc, 2)  # warm up kernels and allocator
    growth = peak_rss_growth(lambda: _run(args.child, model, tok, ext, enc, args.new_tokens))
    print(json.dumps({"rss_growth_bytes": growth}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process RSS measurement")
    ap.add_argument("--child", choices=["plain", "flow"], help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from peak_rss import capture_bound_bytes

    from hf_flowcheck import FlowConfig, FlowExtractor

    torch.set_num_threads(args.threads)
    model, tok = _setup(args.model)
    ext = FlowExtractor(model, FlowConfig(), tokenizer=tok)
    n_blocks, dim = model.config.num_hidden_layers, model.config.hidden_size
    print(f"model={args.model} blocks={n_blocks} d={dim} threads={args.threads} torch={torch.__version__}")
    _run("flow", model, tok, ext, _encode(tok, _prompts(1, tok)), 4)  # warm-up
    rows = []
    for batch in args.batches:
        enc = _encode(tok, _prompts(batch, tok))
        times = {"plain": [], "flow": []}
        for _ in range(args.reps):
            for mode in ("plain", "flow"):
                dt, out, feats, nbytes = _run(mode, model, tok, ext, enc, args.new_tokens)
                times[mode].append(dt)
                if mode == "plain":
                    plain_out = out
                else:
                    same = torch.equal(out, plain_out)
                    n_resp = int(feats.num_tokens().sum())
                    capture_bytes = nbytes
        plain, flow = statistics.median(times["plain"]), statistics.median(times["flow"])
        bound = capture_bound_bytes(n_resp, n_blocks, dim)
        row = {
            "batch": batch,
            "plain_s": round(plain, 3),
            "flow_s": round(flow, 3),
            "ratio": round(flow / plain, 3),
            "same_tokens": same,
            "response_tokens": n_resp,
            "capture_bytes": capture_bytes,
            "bound_bytes": bound,
            "capture_over_bound": round(capture_bytes / bound, 3),
        }
        if not args.no_memory:
            growth = {}
            for mode in ("plain", "flow"):
                res = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        "--batch",
                        str(batch),
                        "--model",
                        args.model,
                        "--new-tokens",
                        str(args.new_tokens),
                        "--threads",
                        str(args.threads),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                growth[mode] = json.loads(res.stdout.strip().splitlines()[-1])["rss_growth_bytes"]
            extra = growth["flow"] - growth["plain"]
            row["peak_rss_extra_bytes"] = extra
            row["peak_rss_extra_over_bound"] = round(extra / bound, 3)
        rows.append(row)
        print(json.dumps(row))
    print()
    print(
        "| batch | plain generate (s) | FlowExtractor.generate (s) | ratio | capture / bound | peak RSS extra / bound |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        mem = r.get("peak_rss_extra_over_bound", "n/a")
        print(f"| {r['batch']} | {r['plain_s']} | {r['flow_s']} | {r['ratio']}x | {r['capture_over_bound']} | {mem} |")


if __name__ == "__main__":
    main()
