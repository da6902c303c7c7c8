"""A bundled validator on corpus answers no part of it was fitted on, whole and cut after k tokens.

The corpus validators are trained on each cell's first answers (the files are in a seeded random
order; the pooled probe of ``smollm2-135m-instruct-corpus`` on the first 100, its flow part on the
first 50). This takes the next ``--per-cell`` labelled answers of every cell after ``--skip``, so the
shipped artifact itself (not a design retrained without a cell) is tested on answers it never saw,
in every prompt style and task of its training mix. Each answer is teacher-forced with the
validator's own ``FlowConfig`` twice: whole, and cut after its first ``--prefix`` tokens (the
features a streaming check with ``flow_check_refit="always"`` reads at that point: the window bases
and the pooled state of the prefix alone). Token confidence (−mean / −min log p) of the whole answer
is the baseline on the same answers.

Run: ``python benchmarks/fresh_answers.py --model SmolLM2-135M-Instruct
--corpus answers/SmolLM2-135M-Instruct/corpus --skip 100 --per-cell 6 --out benchmarks/results/fresh_answers_smol.json``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_flowcheck.bundled import default_validator_for
from hf_flowcheck.data.corpus import CORPUS_TASKS
from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.base import ScoredExample, encode_text
from hf_flowcheck.detectors.baselines import token_confidence_features
from hf_flowcheck.detectors.flow_detector import FlowValidatorDetector
from hf_flowcheck.metrics import auroc, bootstrap_ci, paired_auroc_difference
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.corpus import answer_view, read_corpus


def _row(y: np.ndarray, s: np.ndarray) -> dict:
    lo, hi = bootstrap_ci(auroc, y, s, n=1000)
    return {"auroc": round(auroc(y, s), 3), "ci": [round(lo, 3), round(hi, 3)]}


def add_fresh_options(p: argparse.ArgumentParser, per_cell: int) -> None:
    """The options of a benchmark that runs a validator on each cell's answers after ``--skip``."""
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--validator", default=None, help="A validator folder (default: the model's bundled default).")
    p.add_argument("--skip", type=int, default=100, help="Each cell's first answers, which training may have seen.")
    p.add_argument("--per-cell", type=int, default=per_cell)
    p.add_argument("--basis-solver", choices=("eigh", "subspace"), default="eigh",
                   help="'subspace': the same window bases to float32 precision, faster (FlowConfig.basis_solver).")  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)


def load_fresh(args: argparse.Namespace) -> tuple:
    """``(model, tokenizer, validator)`` of :func:`add_fresh_options`; the validator in eval mode, with the
    chosen basis solver (the same features, ``FlowConfig.same_features``)."""
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    v = FlowValidator.from_pretrained(args.validator) if args.validator else default_validator_for(model)
    v.flow_config = dataclasses.replace(v.flow_config, basis_solver=args.basis_solver)
    return model, tok, v.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fresh_options(p, per_cell=6)
    p.add_argument("--corpus", required=True)
    p.add_argument("--prefix", type=int, default=4, help="Also score each answer cut after this many tokens.")
    args = p.parse_args(argv)
    model, tok, v = load_fresh(args)
    rows, examples, prefixes = [], [], []
    for f in read_corpus(args.corpus):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        views = [x for r in f.labelled if (x := answer_view(r, "primary", tok)) is not None]
        for x in views[args.skip : args.skip + args.per_cell]:
            prompt = encode_text(tok, x.prompt)
            examples.append(ScoredExample(prompt, list(x.gen_ids), int(x.label), x.uid))
            prefixes.append(ScoredExample(prompt, list(x.gen_ids[: args.prefix]), int(x.label), x.uid))
            rows.append((task, style))
    if not rows:
        raise SystemExit(f"no cell has more than {args.skip} labelled answers; lower --skip.")
    t0 = time.perf_counter()
    det = FlowValidatorDetector(v, tokenizer=tok, batch_size=8)
    with torch.inference_mode():
        whole = det.score(det.featurize(model, examples))
        cut = det.score(det.featurize(model, prefixes))
        conf = token_confidence_features(model, examples, batch_size=8)
    y = np.array([e.label for e in examples])
    task = np.array([r[0] for r in rows])
    style = np.array([r[1] for r in rows])
    scores = {"validator": whole, f"validator, first {args.prefix} tokens": cut,
              "-mean log p": conf[:, 0], "-min log p": conf[:, 1]}  # fmt: skip
    trained = ~np.isin(task, [t for t, spec in CORPUS_TASKS.items() if spec.eval_only])
    out: dict = {"validator": str(args.validator or "bundled default"), "answers": len(y), "hallucinated": int(y.sum()),
                 "skip": args.skip, "per_cell": args.per_cell, "seconds": round(time.perf_counter() - t0),
                 "command": "python benchmarks/fresh_answers.py " + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    for name, keep in (("trained tasks", trained), ("never-trained tasks", ~trained)):
        if keep.sum() < 10 or len(set(y[keep].tolist())) < 2:
            continue
        block: dict = {"answers": int(keep.sum()), "hallucinated": int(y[keep].sum())}
        block.update({k: _row(y[keep], s[keep]) for k, s in scores.items()})
        for k in ("-min log p", f"validator, first {args.prefix} tokens"):
            lo, hi = paired_auroc_difference(y[keep], whole[keep], scores[k][keep], n=1000)
            block["validator"][f"minus {k}"] = [round(lo, 3), round(hi, 3)]
        block["validator"]["share_ge_0.99"] = round(float((whole[keep] >= 0.99).mean()), 3)
        block["per style"] = {
            st: {k: round(auroc(y[keep & (style == st)], s[keep & (style == st)]), 3) for k, s in scores.items()}
            for st in sorted(set(style[keep].tolist()))
            if len(set(y[keep & (style == st)].tolist())) == 2
        }
        out[name] = block
        print(name, json.dumps(block))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
