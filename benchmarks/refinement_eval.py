"""Refinement like the paper's Tables 2 and 4, on HaluEval-QA (generated protocol, reference judge).

For the test split of a generated feature store (the same seeded split `flowcheck train` used),
each selected question is answered again with flow scores (same decoding as the store: greedy,
2-shot plain prompt, stop at the first newline, 32 new tokens), then refined with each strategy
— ``regenerate`` (rollback, no clamp), ``random_depth`` (clamp at a seeded random block) and
``flow`` (clamp at the culprit block) — and the refined answer is judged again by the reference
token-F1 judge. Reported: hallucination rate (labelled answers only; dropped ones counted) with
95% bootstrap intervals, on (a) hallucination-labelled answers (the paper's setting) and (b)
validator-flagged answers (score > 0.5, what a deployment can do); and the measured cost factor
per refined row, ``1 + refine_time / generate_time``, next to the bound ``1 + (t_cur - t0)/T``.

Run: ``python benchmarks/refinement_eval.py --features runs/qa-gen-normalized --validator VALIDATOR --out runs/refine``
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

STRATEGIES = ("regenerate", "random_depth", "flow")


def _rate(labels: list[int], n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    y = np.asarray(labels, dtype=float)
    if len(y) == 0:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = [y[rng.integers(0, len(y), len(y))].mean() for _ in range(n_boot)]
    return {
        "value": float(y.mean()),
        "low": float(np.quantile(boots, 0.025)),
        "high": float(np.quantile(boots, 0.975)),
        "n": len(y),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True, help="Generated-protocol store (labels, split).")
    ap.add_argument("--validator", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--limit", type=int, default=None, help="Refine at most this many test questions (seeded).")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=1.05)
    ap.add_argument("--split-seed", type=int, default=0)
    args = ap.parse_args()

    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.data import ReferenceF1Judge, clean_generation, generation_prompt, load_halueval_qa, split_records
    from hf_flowcheck.stopping import bind_prompt_width
    from hf_flowcheck.store import FeatureStore
    from hf_flowcheck.workflows.extract import _newline_stop

    store = FeatureStore.open(args.features)
    samples = store.samples()
    split = split_records([s["uid"] for s in samples], seed=args.split_seed)
    test = set(split.test)
    label_of = {s["uid"]: int(s["label"]) for s in samples if s["uid"] in test}
    records = {r.uid: r for r in load_halueval_qa() if r.uid in label_of}
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, validator=args.validator)
    tok = model.tokenizer
    judge = ReferenceF1Judge()
    gen_kw = dict(
        max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, **_newline_stop(tok)
    )

    def judge_ids(rec, ids, p):
        text = clean_generation(tok.decode(ids[p:], skip_special_tokens=True))
        return judge(rec.question, text, rec.reference).label, text

    rows = []
    uids = sorted(label_of)
    if args.limit is not None:
        # A seeded subset of the test split (not the first uids in string order).
        rng = np.random.default_rng(args.split_seed)
        uids = sorted(rng.choice(uids, size=min(args.limit, len(uids)), replace=False).tolist())
    for i, uid in enumerate(uids):
        rec = records[uid]
        enc = tok(generation_prompt(rec), return_tensors="pt")
        row_kw = bind_prompt_width(gen_kw, enc.input_ids.shape[1])  # also right for refine: same prompt
        t0 = time.perf_counter()
        out = model.generate(**enc, **row_kw, return_flow_scores=True)
        t_gen = time.perf_counter() - t0
        p = out.prompt_length
        initial, answer = judge_ids(rec, out.sequences[0].tolist(), p)
        row = {
            "uid": uid,
            "store_label": label_of[uid],
            "initial": initial,
            "answer": answer,
            "score": float(out.flow_scores[0]),
            "gen_s": t_gen,
        }
        if bool(out.flow_has_events[0]):
            t_pos, _ = (int(x) for x in out.flow_culprits[0])
            n_new = int((out.sequences[0, p:] != tok.pad_token_id).sum())
            row["cost_bound"] = 1 + (p + n_new - 1 - t_pos) / max(1, n_new)
            for strategy in STRATEGIES:
                t1 = time.perf_counter()
                res = model.refine(out, strategy=strategy, rows=[0], alpha=args.alpha, seed=i, **row_kw)
                dt = time.perf_counter() - t1
                if res.rows:
                    r = res.rows[0]
                    label, text = judge_ids(rec, r.refined_ids, r.prompt_length)
                    row[strategy] = {
                        "label": label,
                        "answer": text,
                        "score_after": r.score_after,
                        "cost": 1 + dt / t_gen,
                        "positions_clamped": r.positions_clamped,
                        "mean_lambda": r.mean_lambda,
                    }
                else:
                    row[strategy] = {"label": None, "skipped": res.skipped.get(0)}
        rows.append(row)
        if (i + 1) % 20 == 0:
            print(f"{i + 1}/{len(uids)} questions", flush=True)

    def table(sel, name):
        out = {"set": name, "n": len(sel)}
        out["initial"] = _rate([r["initial"] for r in sel if r["initial"] is not None])
        for s in STRATEGIES:
            labs = [r[s]["label"] for r in sel if s in r and r[s]["label"] is not None]
            out[s] = _rate(labs)
        return out

    set_a = [r for r in rows if r["store_label"] == 1]
    set_b = [r for r in rows if r["score"] == r["score"] and r["score"] > 0.5]
    result = {
        "a_hallucination_labelled": table(set_a, "(a) hallucination-labelled"),
        "b_validator_flagged": table(set_b, "(b) validator-flagged (score > 0.5)"),
        "cost": {
            s: float(np.mean([r[s]["cost"] for r in rows if s in r and "cost" in r[s]] or [np.nan])) for s in STRATEGIES
        },
        "cost_bound": float(np.mean([r["cost_bound"] for r in rows if "cost_bound" in r] or [np.nan])),
        "decoding": f"greedy, 2-shot plain prompt, stop at newline, max_new_tokens={args.max_new_tokens}",
        "alpha": args.alpha,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "refinement.json").write_text(json.dumps({"summary": result, "rows": rows}, indent=2))
    print("| set | n | Initial | Regenerate | Random depth | Flow guided |")
    print("|---|---|---|---|---|---|")
    for key in ("a_hallucination_labelled", "b_validator_flagged"):
        t = result[key]

        def f(m):
            return (
                "n/a"
                if m["n"] == 0
                else f"{100 * m['value']:.1f}% [{100 * m['low']:.1f}, {100 * m['high']:.1f}] (n={m['n']})"
            )

        print(
            f"| {t['set']} | {t['n']} | {f(t['initial'])} | {f(t['regenerate'])} | {f(t['random_depth'])} | {f(t['flow'])} |"
        )
    print(
        f"cost factor per refined row (measured, mean): {result['cost']}; bound 1+(t_cur-t0)/T mean: {result['cost_bound']:.2f}"
    )


if __name__ == "__main__":
    main()
