"""Cost of streaming flow checks against ``check_every``, as ratios measured in one run.

For each ``check_every`` in the list, times ``FlowCheckedModelForCausalLM.generate`` with
``flow_check_every=k`` (no abstention, so every row runs to the full budget) against plain
``model.generate`` and against flow scoring at the end only, on the same HaluEval-QA prompts
(greedy, fixed number of new tokens). The validator's weights do not change the cost: the bundled
validator is used when present, else a randomly initialised one of the same shape.

Rows: plain ``generate``; the flow score at the end; a streaming check every ``k`` tokens; the same
with ``flow_rollback_threshold`` (rows crossing it are rolled back and regenerated in the call);
and, at batch 1, the :class:`~hf_flowcheck.FlowTextStreamer` (checks every token). Each batch size
in ``--batches`` gets its own table, runs alternating within every repetition.

``--refit always doubling`` times each streaming row with both ``flow_check_refit`` settings (the
per-token lens channels and JVPs are computed once per token in both). ``--lens-candidates K``
times the same validator with ``FlowConfig(lens_candidates=K)`` (timing only: its weights were
trained on exact lens channels, so its scores are not the validator's); ``--competitor-candidates C``
likewise with ``FlowConfig(competitor_candidates=C)``. ``--basis-solver eigh subspace``
times every flow row with each ``FlowConfig.basis_solver`` (same features to float32 precision, so
the validator's own scores), alternating within each repetition.

``--memory`` adds each row's peak resident-set growth minus plain ``generate``'s, each mode measured
in a fresh process (model loading and a warm-up excluded; ``--memory-reps N``: N processes per row,
median and range), next to the capture bound
``R·(B+1)·3·d·4`` bytes (``R`` = batch × new tokens, ``B`` blocks, ``d`` hidden size).

``--device cuda --dtype bfloat16`` runs the same table on an accelerator (timings synchronised with
the device before each clock read); ``--model Qwen2.5-Coder-0.5B-Instruct`` on the second bundled
model. The device, dtype and model are printed in each table's header.

Run: ``python benchmarks/streaming.py --batches 1 8 --every 1 2 4 --rollback 0.5 --refit always doubling``
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--validator", default=None, help="Folder, Hub id or bundled:<name> (default: the bundled one).")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--every", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rollback", type=float, default=None, help="Also time rollback at this threshold.")
    ap.add_argument("--refit", nargs="+", default=["always"], choices=["always", "doubling"])
    ap.add_argument("--lens-candidates", type=int, default=0, help="Time FlowConfig(lens_candidates=K) (timing only).")
    ap.add_argument(
        "--competitor-candidates", type=int, default=0, help="Time FlowConfig(competitor_candidates=C) (timing only)."
    )
    ap.add_argument("--basis-solver", nargs="+", default=["eigh"], choices=["eigh", "subspace"])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ... (the model and the flow math).")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--memory", action="store_true", help="Also measure each row's peak RSS in a fresh process.")
    ap.add_argument(
        "--memory-reps",
        type=int,
        default=1,
        help="Fresh processes per row for --memory; the table shows the median and the range (the RSS sampler "
        "and the allocator move single figures by a few MiB).",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from hf_flowcheck import FlowCheckedModelForCausalLM, FlowConfig, FlowValidator, ValidatorConfig

    kwargs = {} if args.validator is None else {"validator": args.validator}
    if args.memory and args.device != "cpu":
        raise SystemExit("--memory measures host RSS; run it with --device cpu.")
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), **kwargs)
    model.to(args.device)
    which = args.validator or "bundled"
    if model.validator is None:
        cfg = FlowConfig()
        v = FlowValidator(ValidatorConfig.from_feature_names(cfg.feature_names), flow_config=cfg).eval()
        model = FlowCheckedModelForCausalLM(model.base_model, v, tokenizer=model.tokenizer, check_compatibility=False)
        which = "random (same shape)"
    for field, value in (
        ("lens_candidates", args.lens_candidates),
        ("competitor_candidates", args.competitor_candidates),
    ):
        if value:
            import copy
            import dataclasses

            v = copy.deepcopy(model.validator)
            v.flow_config = dataclasses.replace(v.flow_config, **{field: value})
            model = FlowCheckedModelForCausalLM(
                model.base_model, v, tokenizer=model.tokenizer, check_compatibility=False
            )
            which += f", {field}={value} (timing only)"
    tok = model.tokenizer
    tok.padding_side = "left"
    import dataclasses

    models = {
        solver: FlowCheckedModelForCausalLM(
            model.base_model,
            model.validator,
            dataclasses.replace(model.flow_config, basis_solver=solver),
            tokenizer=tok,
            check_compatibility=False,
        )
        for solver in args.basis_solver
    }
    if args.child:
        child(models, tok, args)
        return
    for batch in args.batches:
        table(models, tok, batch, args, which)


def _encode(tok, batch: int, args: argparse.Namespace):
    from hf_flowcheck.data import generation_prompt, load_halueval_qa

    records = load_halueval_qa(limit=batch + 10)[10 : 10 + batch]
    enc = tok([generation_prompt(r) for r in records], return_tensors="pt", padding=True).to(args.device)
    kw = dict(
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    return enc, kw


def _runner(models: dict, tok, enc, kw: dict, args: argparse.Namespace):
    """``run(mode, solver)``: one generation in the given mode, returning its seconds."""
    from hf_flowcheck import FlowTextStreamer

    def sync():
        if enc["input_ids"].device.type == "cuda":
            torch.cuda.synchronize()

    def run(mode, solver):
        model = models[solver]
        sync()
        t0 = time.perf_counter()
        if mode == "plain":
            model.generate(**enc, **kw)
        elif mode == "final":
            model.generate(**enc, **kw, return_flow_scores=True)
        elif mode == "streamer":
            model.generate(**enc, **kw, streamer=FlowTextStreamer(tok))
        elif mode[0] == "rollback":
            model.generate(
                **enc, **kw, flow_check_every=mode[1], flow_rollback_threshold=args.rollback, flow_check_refit=mode[2]
            )
        else:
            model.generate(**enc, **kw, return_flow_scores=True, flow_check_every=mode[1], flow_check_refit=mode[2])
        sync()
        return time.perf_counter() - t0

    return run


def _mode_key(mode) -> str:
    return mode if isinstance(mode, str) else ":".join(map(str, mode))


def _mode_from_key(key: str):
    if ":" not in key:
        return key
    kind, k, refit = key.split(":")
    return (kind, int(k), refit)


def child(models: dict, tok, args: argparse.Namespace) -> None:
    """Peak RSS growth of one mode in this (fresh) process, printed as JSON."""
    from peak_rss import peak_rss_growth

    enc, kw = _encode(tok, args.child_batch, args)
    mode, solver = _mode_from_key(args.child), args.basis_solver[0]
    run = _runner(models, tok, enc, kw, args)
    run(mode, solver)  # warm up kernels and allocator
    print(json.dumps({"rss_growth_bytes": peak_rss_growth(lambda: run(mode, solver))}))


def _child_growth(mode, solver: str, batch: int, args: argparse.Namespace) -> int:
    cmd = [sys.executable, __file__, "--child", _mode_key(mode), "--child-batch", str(batch)]
    cmd += ["--model", args.model, "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    cmd += ["--dtype", args.dtype]
    cmd += ["--basis-solver", solver, "--lens-candidates", str(args.lens_candidates)]
    cmd += ["--competitor-candidates", str(args.competitor_candidates)]
    if args.validator:
        cmd += ["--validator", args.validator]
    if args.rollback is not None:
        cmd += ["--rollback", str(args.rollback)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["rss_growth_bytes"]


def table(models: dict, tok, batch: int, args: argparse.Namespace, which: str) -> None:
    enc, kw = _encode(tok, batch, args)
    print(
        f"\nmodel={args.model} validator={which} batch={batch} new_tokens={args.new_tokens} threads={args.threads} "
        f"device={args.device} dtype={args.dtype}"
    )
    run = _runner(models, tok, enc, kw, args)

    flow = ["final", *[("check", k, r) for k in args.every for r in args.refit]]
    if args.rollback is not None:
        flow += [("rollback", k, r) for k in args.every for r in args.refit]
    if batch == 1:
        flow.append("streamer")
    first = args.basis_solver[0]
    modes = [("plain", first)] + [(m, solver) for m in flow for solver in args.basis_solver]
    for solver in args.basis_solver:
        run("final", solver)  # warm-up
    times = {m: [] for m in modes}
    for _ in range(args.reps):
        for m in modes:
            times[m].append(run(*m))
    extra = {}
    if args.memory:
        from peak_rss import capture_bound_bytes

        base = next(iter(models.values())).base_model.config
        bound = capture_bound_bytes(batch * args.new_tokens, base.num_hidden_layers, base.hidden_size)
        runs = {m: [_child_growth(m[0], m[1], batch, args) for _ in range(args.memory_reps)] for m in modes}
        plain_growth = statistics.median(runs[("plain", first)])
        extra = {m: [(g - plain_growth) / 2**20 for g in gs] for m, gs in runs.items()}
        print(
            f"capture bound R*(B+1)*3*d*4 = {bound / 2**20:.1f} MiB; plain generate peak RSS growth {plain_growth / 2**20:.1f} MiB"
            f" (medians of {args.memory_reps} fresh processes per row; range in brackets)"
        )
    plain = statistics.median(times[("plain", first)])
    mem_head = " peak RSS extra / bound |" if extra else ""
    print(f"| mode | basis solver | seconds | ratio to plain generate | checks per row |{mem_head}")
    print("|---|---|---|---|---|" + ("---|" if extra else ""))
    for m, solver in modes:
        t = statistics.median(times[(m, solver)])
        if isinstance(m, tuple):
            label, k = f"check_every={m[1]}, refit {m[2]}", m[1]
            if m[0] == "rollback":
                label += f" + rollback at {args.rollback}"
        else:
            label = {"plain": "plain generate", "final": "flow score at the end", "streamer": "FlowTextStreamer"}[m]
            k = 1
        checks = "-" if m in ("plain", "final") else str((args.new_tokens - 1) // k)
        mem = ""
        if extra:
            mib = extra[(m, solver)]
            med = statistics.median(mib)
            mem = f" {med * 2**20 / bound:.2f} ({med:.0f} MiB [{min(mib):.0f}, {max(mib):.0f}]) |"
        print(f"| {label} | {'-' if m == 'plain' else solver} | {t:.2f} | {t / plain:.2f}x | {checks} |{mem}")


if __name__ == "__main__":
    main()
