"""Sampling agreement on held-out corpus answers, next to the matrix's validator on the same answers.

For each prompt style in ``--styles``, a seeded random subset of the answers held out in the
transfer matrix's ``style=<style>`` run gets SelfCheckGPT-style sampling agreement
(:class:`~hf_flowcheck.detectors.baselines.SamplingAgreementDetector`: ``n`` samples at temperature
1, each post-processed like the corpus answer of that style, token F1 against the greedy answer).
Reported on exactly those answers: AUROC with 95% bootstrap intervals of sampling agreement, the
validator trained without that style, and -min log p; paired differences; and the cost of
sampling as a multiple of the greedy generation it checks (one process, what else ran is printed).

Command (docs/results.md):

    python benchmarks/corpus_sampling.py --corpus answers/SmolLM2-135M-Instruct/corpus \
        --features runs/corpus-feats/smol --scores runs/corpus-feats/smol-matrix-tc-styles.json \
        --styles chat plain-fewshot --per-style 120 --out benchmarks/results/corpus_sampling_smol.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hf_flowcheck.data.corpus import postprocess_for
from hf_flowcheck.detectors.base import ScoredExample, encode_text
from hf_flowcheck.detectors.baselines import SamplingAgreementDetector
from hf_flowcheck.metrics import auroc, bootstrap_ci, paired_auroc_difference
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.corpus import answer_view, read_corpus


def ci(y, s) -> dict:
    lo, hi = bootstrap_ci(auroc, y, s, n=1000)
    return {"auroc": round(auroc(y, s), 3), "ci": [round(lo, 3), round(hi, 3)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--features", required=True, help="The matrix's feature root (for the -min log p of each answer).")
    ap.add_argument("--scores", required=True, help="The transfer matrix's scores JSON (style runs).")
    ap.add_argument("--styles", nargs="+", default=["chat"])
    ap.add_argument("--per-style", type=int, default=120)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_model(args.model)
    model.eval()
    matrix = json.loads(Path(args.scores).read_text())
    uids, labels = matrix["uids"], np.asarray(matrix["labels"])
    records = {}
    for f in read_corpus(args.corpus):
        for r in f.labelled:
            v = answer_view(r, "primary", tok)
            if v is not None:
                records[r.uid] = v
    conf = {}
    for cell in Path(args.features).glob("*/*"):
        path = cell / "token_confidence.json"
        if path.is_file():
            conf.update(json.loads(path.read_text()))
    result: dict = {"command": "python benchmarks/corpus_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
                    "design": matrix.get("design"), "n": args.n, "styles": {}}  # fmt: skip
    for style in args.styles:
        run = matrix["runs"][f"style={style}"]
        test = np.asarray(run["test"])
        pick = np.random.default_rng(args.seed).permutation(test)[: args.per_style]
        pick = np.asarray([i for i in pick if uids[i] in records and uids[i] in conf])
        det = SamplingAgreementDetector(
            args.n, max_new_tokens=64 if style.startswith("chat") else 24, seed=args.seed,
            postprocess=postprocess_for(style), stop_at_answer_line=not style.startswith("chat"),
        )  # fmt: skip
        ex = []
        for i in pick:
            r = records[uids[i]]
            ex.append(ScoredExample(encode_text(tok, r.prompt), list(r.gen_ids), int(r.label), r.uid, answer=r.answer))
        t0 = time.perf_counter()
        agree = det.featurize(model, ex, tokenizer=tok)
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        with torch.inference_mode():  # the greedy answers these samples check, for the cost ratio
            for e in ex[:20]:
                ids = torch.tensor([e.prompt_ids])
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=len(e.answer_ids), min_new_tokens=len(e.answer_ids),
                               pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        t_greedy = (time.perf_counter() - t0) / min(20, len(ex)) * len(ex)
        y = labels[pick]
        validator = np.asarray(run["scores"])[pick]
        min_lp = np.asarray([conf[uids[i]][1] for i in pick])
        row = {
            "answers": len(pick),
            "hallucinated": int(y.sum()),
            "sampling agreement": ci(y, agree),
            "validator (trained without this style)": ci(y, validator),
            "-min log p": ci(y, min_lp),
            "validator minus sampling": [round(x, 3) for x in paired_auroc_difference(y, validator, agree, n=1000)],
            "sampling minus -min log p": [round(x, 3) for x in paired_auroc_difference(y, agree, min_lp, n=1000)],
            "sampling seconds": round(t_sample, 1),
            "sampling cost / greedy generation": round(t_sample / max(t_greedy, 1e-9), 1),
        }
        result["styles"][style] = row
        print(style, json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
