"""Does refinement give fewer wrong answers than sampling again? (issue: refinement that helps).

The model's own HaluEval-QA answers (the committed answers file, generated protocol, reference
token-F1 judge) on one split of the validator's own grouped split (``--first`` answers, seed 0:
the rows it was trained on, so ``--split test`` never touches its training or selection data).
Each question is answered again with flow scores (greedy, the file's prompt, stop rule and budget);
answers the validator flags (score above its validation-chosen ``precision_0.8`` threshold, or
``--threshold``) are refined by every configuration under every decoding setting and judged again.

Configurations are ``strategy[:field=value,...]`` with :class:`~hf_flowcheck.RefineConfig` fields,
e.g. ``flow:alpha=0.2,band=2`` or ``resample:num_culprits=3``. Decoding settings are ``greedy`` or
``sample:T`` (temperature ``T``; each question's seed is fixed, so every strategy draws from the
same random stream); ``config@decoding`` runs a configuration under that decoding only. Rows are appended to ``--out`` (JSONL) as they finish; a rerun skips what is
there. ``--summary`` prints the tables from that file without running anything.

It also measures **culprit quality**: for hallucinated answers, how often the validator's culprit
lies in the wrong part of the answer (answer tokens overlapping a word that is not in the
reference), against a random answer token and against the lowest-probability answer token.

Run (validation sweep, then the test table)::

    python benchmarks/refinement_eval.py --split validation --limit 120 --out runs/refine/val.jsonl \
        --configs flow flow:alpha=0.5 flow:alpha=0.2 flow:alpha=0.05 flow:band=2 flow:alpha=0.2,band=2
    python benchmarks/refinement_eval.py --split test --limit 260 --out runs/refine/test.jsonl \
        --configs flow:alpha=0.2,band=2 random_depth:alpha=0.2,band=2 regenerate resample \
        --decoding greedy sample:0.7
    python benchmarks/refinement_eval.py --summary runs/refine/test.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import string
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ARTICLES = {"a", "an", "the"}


# ------------------------------------------------------------------------------------ parsing
def parse_config(spec: str) -> tuple[str, dict]:
    """``"flow:alpha=0.2,band=2"`` -> ``("flow", {"alpha": 0.2, "band": 2})`` (values as JSON, else text)."""
    strategy, _, rest = spec.partition(":")
    fields: dict = {"strategy": strategy}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--configs {spec!r}: {item!r} is not field=value.")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return spec, fields


def parse_decoding(spec: str) -> dict:
    if spec == "greedy":
        return {"do_sample": False}
    kind, _, temp = spec.partition(":")
    if kind != "sample" or not temp:
        raise SystemExit(f"--decoding {spec!r}: use greedy or sample:T (T the temperature).")
    return {"do_sample": True, "temperature": float(temp), "top_k": 0, "top_p": 1.0}


# ----------------------------------------------------------------------------------- the judge
def _norm_word(w: str) -> str:
    w = w.lower().strip(string.punctuation)
    return "" if w in ARTICLES else w


def wrong_tokens(tok, gen: list[int], n_answer: int, references: list[str]) -> list[bool]:
    """Per answer token: does it overlap a word that is in no reference answer? ``[n_answer]``."""
    ref_words = {_norm_word(w) for r in references for w in re.findall(r"\w+", r)} - {""}
    text = tok.decode(gen[:n_answer], skip_special_tokens=True)
    ends = [len(tok.decode(gen[: i + 1], skip_special_tokens=True)) for i in range(n_answer)]
    starts = [0, *ends[:-1]]
    bad_spans = [
        (m.start(), m.end())
        for m in re.finditer(r"\w+", text)
        if _norm_word(m.group()) and _norm_word(m.group()) not in ref_words
    ]
    return [any(s < e2 and s2 < e for s2, e2 in bad_spans) for s, e in zip(starts, ends)]


def done_rows(path: Path) -> set:
    """``(uid, config, decoding)`` of every row already in the JSONL at ``path`` (its folder is created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return set()
    rows = (json.loads(line) for line in path.read_text().splitlines())
    return {(row["uid"], row.get("config"), row.get("decoding")) for row in rows}


def _seed_of(uid: str) -> int:
    return int.from_bytes(hashlib.blake2b(uid.encode(), digest_size=4).digest(), "little")


# -------------------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> None:
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.data import clean_generation, split_records
    from hf_flowcheck.data.judges import judge_record
    from hf_flowcheck.stopping import bind_prompt_width
    from hf_flowcheck.tokens import answer_token_count
    from hf_flowcheck.workflows.answers import load_answer_records, read_answers
    from hf_flowcheck.workflows.extract import newline_stop_kwargs

    answers = read_answers(args.answers)
    first = answers.records[: args.first]
    labelled = [r for r in first if r.label is not None]
    split = split_records([r.uid for r in labelled], seed=0)
    chosen = set(getattr(split, args.split))
    pool = [r for r in labelled if r.uid in chosen]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order][: args.limit]
    print(f"{args.split}: {len(chosen)} questions in the split of the first {len(first)} answers; using {len(pool)}")

    source, judge = load_answer_records("halueval-qa", None, seed=0, limit=None)
    by_uid = {r.uid: r for r in source}
    from hf_flowcheck.bundled import bundled_validators

    validator = str(bundled_validators().get(args.validator, args.validator))
    model = FlowCheckedModelForCausalLM.from_pretrained(args.model, validator=validator)
    tok = model.tokenizer
    threshold = model.validator.recommended_threshold() if args.threshold is None else args.threshold
    budget = int(answers.header["decoding"]["max_new_tokens"])
    gen_kw = {"max_new_tokens": budget, "pad_token_id": tok.pad_token_id, **newline_stop_kwargs(tok)}
    # "config@decoding" runs that configuration under that decoding only; a bare one under every --decoding.
    jobs = []
    for spec in args.configs:
        cspec, _, only = spec.partition("@")
        cname, fields = parse_config(cspec)
        for dname in [only] if only else args.decoding:
            jobs.append((cname, fields, dname, parse_decoding(dname)))

    out_path = Path(args.out)
    done = done_rows(out_path)
    fh = out_path.open("a")

    def emit(row: dict) -> None:
        fh.write(json.dumps(row) + "\n")
        fh.flush()

    def judged(rec, gen: list[int]) -> tuple[int | None, str]:
        text = clean_generation(tok.decode(gen, skip_special_tokens=True))
        return judge_record(judge, rec, text).label, text

    t_start = time.perf_counter()
    for n, arec in enumerate(pool):
        rec = by_uid[arec.uid]
        todo = [(c, d) for c, _, d, _ in jobs if (arec.uid, c, d) not in done]
        if (arec.uid, None, None) in done and not todo:
            continue
        enc = tok(arec.prompt, return_tensors="pt")
        p = enc.input_ids.shape[1]
        row_kw = bind_prompt_width(gen_kw, p)
        t0 = time.perf_counter()
        out = model.generate(**enc, **row_kw, do_sample=False, return_flow_scores=True, output_logits=True)
        t_gen = time.perf_counter() - t0
        eos = set(model.extractor.eos_ids)
        gen = []
        for t in out.sequences[0, p:].tolist():
            if t in eos:
                break
            gen.append(t)
        label, text = judged(rec, gen)
        score = float(out.flow_scores[0])
        flagged = bool(out.flow_has_events[0]) and score > threshold
        if (arec.uid, None, None) not in done:
            n_ans = answer_token_count(tok, gen, text, clean_generation)
            base = {
                "uid": arec.uid,
                "config": None,
                "decoding": None,
                "label": label,
                "file_label": arec.label,
                "same_as_file": gen == list(arec.gen_ids),
                "score": score,
                "flagged": flagged,
                "threshold": threshold,
                "gen_s": t_gen,
                "n_new": len(gen),
            }
            if bool(out.flow_has_events[0]) and n_ans > 0:
                t_pos, b_pos = (int(v) for v in out.flow_culprits[0])
                logp = torch.stack([torch.log_softmax(lg[0].float(), -1) for lg in out.logits])  # [steps, V]
                tok_logp = [float(logp[i, g]) for i, g in enumerate(gen[:n_ans])]
                base["culprit"] = {
                    "at": t_pos - p,
                    "block": b_pos,
                    "n_answer": n_ans,
                    "wrong": wrong_tokens(tok, gen, n_ans, [str(r) for r in rec.references or []]),
                    "lowest_prob": int(np.argmin(tok_logp)),
                }
            emit(base)
        if not flagged:
            continue
        t_cur = p + len(out.sequences[0, p:]) - 1
        for cname, fields, dname, dec in jobs:
            if (arec.uid, cname, dname) in done:
                continue
            kw = dict(fields)
            kw.setdefault("seed", _seed_of(arec.uid))
            # The table needs only the judge's label; re-scoring is for choosing among candidates.
            kw.setdefault("rescore", int(kw.get("num_culprits", 1)) > 1)
            t1 = time.perf_counter()
            res = model.refine(out, rows=[0], **kw, **row_kw, **dec)
            dt = time.perf_counter() - t1
            row = {"uid": arec.uid, "config": cname, "decoding": dname, "label_before": label}
            if res.rows:
                r = res.rows[0]
                new_gen = r.refined_answer_ids
                new_gen = [t for t in new_gen if t not in eos]
                new_label, new_text = judged(rec, new_gen)
                t_roll = r.culprit_before[0]
                n_orig = max(1, len(out.sequences[0, p:]))
                steps = len(r.refined_answer_ids) - (t_roll + 1 - p)  # decode steps refinement ran
                row.update(
                    label_after=new_label,
                    changed=new_gen != gen,
                    answer_after=new_text,
                    score_after=r.score_after,
                    positions_clamped=r.positions_clamped,
                    positions_patched=r.positions_patched,
                    mean_lambda=r.mean_lambda,
                    time_ratio=1 + dt / t_gen,
                    step_ratio=1 + steps * r.candidates / n_orig,
                    bound=1 + (t_cur - t_roll) / n_orig * r.candidates,
                    candidates=r.candidates,
                )
            else:
                row["skipped"] = res.skipped.get(0)
            emit(row)
        if (n + 1) % 10 == 0:
            el = time.perf_counter() - t_start
            print(f"{n + 1}/{len(pool)} questions, {el / 60:.1f} min", flush=True)
    fh.close()


# ------------------------------------------------------------------------------------ summary
def _boot(values: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    boots = values[idx].mean(1)
    return float(values.mean()), float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _fmt(m: tuple[float, float, float], pct: bool = True) -> str:
    f = 100 if pct else 1
    return "n/a" if m[0] != m[0] else f"{f * m[0]:.1f} [{f * m[1]:.1f}, {f * m[2]:.1f}]"


def summarize(path: str, answers: str | None, min_score: float | None = None) -> dict:
    """The tables of a rows file; ``answers=None`` reads each original answer's text from its row.

    ``min_score``: only flagged answers scoring above it (a stricter operating point than the run's).
    """
    from hf_flowcheck.workflows.answers import read_answers

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    base = {r["uid"]: r for r in rows if r["config"] is None}
    # The judged text of each original answer (the regenerated answers equal the file's; checked below).
    if answers is None:
        text_of = {u: r["answer"] for u, r in base.items()}
    else:
        text_of = {r.uid: r.answer for r in read_answers(answers).records}
    flagged = [u for u, r in base.items() if r["flagged"] and r["label"] is not None]
    if min_score is not None:
        flagged = [u for u in flagged if base[u]["score"] > min_score]
    out: dict = {"questions": len(base), "flagged_labelled": len(flagged), "min_score": min_score}
    same = [r["same_as_file"] for r in base.values()]
    out["same_as_file"] = float(np.mean(same)) if same else float("nan")
    by = defaultdict(dict)
    for r in rows:
        if r["config"] is not None:
            by[(r["config"], r["decoding"])][r["uid"]] = r
    print(
        f"{len(base)} questions, {len(flagged)} flagged and labelled; regenerated answer equals the file's: "
        f"{100 * out['same_as_file']:.1f}%"
    )
    # Compare every configuration on the same questions: those that all of them finished.
    common = [u for u in flagged if all(u in got for got in by.values())]
    out["common_questions"] = len(common)
    print(f"{len(common)} flagged questions finished by every configuration (the rows below)")
    print(
        "\n| strategy | decoding | n | hallucinated before % | after % | change (pp) | "
        "right→wrong % (n) | wrong→right % | tokens changed % | judged answer changed % | tokens clamped | cost (time) | cost (decode steps) | bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    table = []
    for (cname, dname), got in by.items():
        uids = [u for u in common if got[u].get("label_after") is not None]
        if not uids:
            continue
        before = np.array([base[u]["label"] for u in uids], float)
        after = np.array([got[u]["label_after"] for u in uids], float)
        diff = _boot(after - before)
        right = before == 0
        wrong = before == 1
        r2w = _boot(after[right]) if right.any() else (float("nan"),) * 3
        w2r = _boot(1 - after[wrong]) if wrong.any() else (float("nan"),) * 3
        changed = np.mean([got[u]["changed"] for u in uids])
        # What a reader sees: the judged answer (its first line) differs, not only tokens after it.
        judged_changed = np.mean([got[u]["answer_after"] != text_of.get(u) for u in uids])
        clamped = np.mean([got[u]["positions_clamped"] for u in uids])
        cost_t = np.median([got[u]["time_ratio"] for u in uids])
        cost_k = np.mean([got[u]["step_ratio"] for u in uids])
        bound = np.mean([got[u]["bound"] for u in uids])
        skipped = sum(1 for u in common if "skipped" in got[u])
        entry = {
            "config": cname,
            "decoding": dname,
            "n": len(uids),
            "skipped": skipped,
            "before": _boot(before),
            "after": _boot(after),
            "change": diff,
            "right_to_wrong": r2w,
            "n_right_before": int(right.sum()),
            "wrong_to_right": w2r,
            "changed": float(changed),
            "judged_answer_changed": float(judged_changed),
            "positions_clamped": float(clamped),
            "cost_time_median": float(cost_t),
            "cost_steps": float(cost_k),
            "bound": float(bound),
        }
        table.append(entry)
        print(
            f"| {cname} | {dname} | {len(uids)} | {_fmt(entry['before'])} | {_fmt(entry['after'])} | "
            f"{_fmt(diff)} | {_fmt(r2w)} ({int(right.sum())}) | {_fmt(w2r)} | {100 * changed:.1f} | {100 * judged_changed:.1f} | {clamped:.1f} | "
            f"{cost_t:.2f}× | {cost_k:.2f}× | {bound:.2f}× |"
        )
    out["table"] = table
    # Culprit quality on hallucinated answers with an identifiable wrong part.
    hits = defaultdict(list)
    for r in base.values():
        c = r.get("culprit")
        if r["label"] != 1 or not c or not any(c["wrong"]):
            continue
        w = c["wrong"]
        n_ans = c["n_answer"]
        hits["random answer token (expected)"].append(sum(w) / n_ans)
        hits["lowest-probability token"].append(float(w[c["lowest_prob"]]))
        at = c["at"]
        hits["validator culprit: token at t0"].append(float(0 <= at < n_ans and w[at]))
        hits["validator culprit: token it decides (t0+1)"].append(float(0 <= at + 1 < n_ans and w[at + 1]))
        hits["culprit inside the answer tokens (t0+1)"].append(float(0 <= at + 1 < n_ans))
    print("\nCulprit quality (hallucinated answers with a wrong part):")
    print("| pointer | lands on a wrong-part token, % [95% CI] | n |")
    print("|---|---|---|")
    out["culprit_quality"] = {}
    for name, vals in hits.items():
        m = _boot(np.array(vals, float))
        out["culprit_quality"][name] = {"mean": m, "n": len(vals)}
        print(f"| {name} | {_fmt(m)} | {len(vals)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", default="answers/SmolLM2-135M-Instruct/halueval-qa.jsonl")
    ap.add_argument("--first", type=int, default=3999, help="Answers the validator's split was made from.")
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--validator", default="smollm2-135m-instruct-halueval-qa")
    ap.add_argument("--split", choices=("validation", "test"), default="validation")
    ap.add_argument("--limit", type=int, default=None, help="Questions (a seeded sample of the split).")
    ap.add_argument("--threshold", type=float, default=None, help="Default: the validator's precision_0.8 one.")
    ap.add_argument("--configs", nargs="+", default=["flow", "random_depth", "regenerate", "resample"])
    ap.add_argument("--decoding", nargs="+", default=["greedy"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--summary", default=None, help="Print the tables of this JSONL and exit.")
    ap.add_argument("--summary-json", default=None, help="Also write the summary here.")
    args = ap.parse_args()
    if args.summary:
        res = summarize(args.summary, args.answers)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(res, indent=2))
        return
    if not args.out:
        raise SystemExit("--out is required (the JSONL the rows are appended to).")
    torch.set_grad_enabled(False)
    run(args)
    summarize(args.out, args.answers)


if __name__ == "__main__":
    main()
