"""Does refinement lower the hallucination rate on corpus answers no validator saw? (issue 28, part 4).

The same question as ``benchmarks/refinement_eval.py``, asked where users are: the model's own answers
of every corpus cell (five prompt styles, chat and plain; the tasks with references), each cell's
labelled answers after ``--skip`` (the bundled corpus validators were fitted on each cell's first 100
at most), scored by the bundled corpus validator with the culprit of the code that runs (the riskiest
token with a word character).

Each answer is generated again with flow scores, as the corpus generated it (greedy, the cell's
prompt and budget, the model's end of turn; plain styles stop at the answer line, the primary view
the validator scores). Answers the validator flags (score above ``--threshold``, default its
``recommended_threshold()``) are refined by every configuration and judged again by the corpus judge
(alias lists, ``hf_flowcheck.data.corpus.judge_answer``).

Configurations are ``strategy[:field=value,...]`` with :class:`~hf_flowcheck.RefineConfig` fields
(``refinement_eval.py`` parses them), plus one benchmark-only field: ``pointer=lowest_prob`` replaces
the culprit by the answer's lowest-probability scored token (at that token's largest event), the
rollback a user could do with token confidence alone. ``config@greedy`` / ``config@sample:T`` picks
the decoding; every strategy of an answer draws from the same seeded random stream.

Rows are appended to ``--out`` (JSONL) as they finish; a rerun skips what is there. ``--summary``
prints the table (``refinement_eval.summarize``).

Run::

    python benchmarks/refinement_corpus.py --corpus answers/SmolLM2-135M-Instruct/corpus --skip 100 \\
        --per-cell 12 --basis-solver subspace --out runs/refine-corpus/smol.jsonl \\
        --configs flow@sample:0.7 flow:rollback=culprit@sample:0.7 regenerate:rollback=culprit@sample:0.7 \\
        regenerate:rollback=culprit,pointer=lowest_prob@sample:0.7 resample@sample:0.7 \\
        resample:num_culprits=3@sample:0.7 flow:rollback=culprit@greedy
    python benchmarks/refinement_corpus.py --summary runs/refine-corpus/smol.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from fresh_answers import add_fresh_options, load_fresh  # sibling benchmarks
from refinement_eval import _seed_of, done_rows, parse_config, parse_decoding, summarize

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.data.corpus import judge_answer, load_task_records, postprocess_for
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.model_io import eos_token_ids
from hf_flowcheck.stopping import bind_prompt_width
from hf_flowcheck.workflows.corpus import answer_view, read_corpus
from hf_flowcheck.workflows.extract import newline_stop_kwargs


def _lowest_prob_culprit(out, p: int) -> tuple[int, int] | None:
    """``(t, b)``: the scored answer token with the lowest probability, at the block of its largest event."""
    pos = out.flow_positions[0]
    ev = out.flow_event_scores[0].masked_fill(~out.flow_event_mask[0], float("-inf"))  # [B, T]
    best = None
    for j, t in enumerate(pos.tolist()):
        if t < p or not bool(torch.isfinite(ev[:, j]).any()):
            continue
        logp = float(torch.log_softmax(out.logits[t - p][0].float(), -1)[out.sequences[0, t]])
        if best is None or logp < best[0]:
            best = (logp, t, int(ev[:, j].argmax()))
    return None if best is None else (best[1], best[2])


def _jobs(specs: list[str]) -> list[tuple[str, dict, str, dict]]:
    jobs = []
    for spec in specs:
        cspec, _, dname = spec.partition("@")
        cname, fields = parse_config(cspec)
        dname = dname or "greedy"
        jobs.append((cname, fields, dname, parse_decoding(dname)))
    return jobs


def run(args: argparse.Namespace) -> None:
    model, tok, v = load_fresh(args)
    fc = FlowCheckedModelForCausalLM(model, v, tokenizer=tok)
    threshold = v.recommended_threshold() if args.threshold is None else args.threshold
    eos = sorted(eos_token_ids(model, tok))
    jobs = _jobs(args.configs)
    out_path = Path(args.out)
    done = done_rows(out_path)
    fh = out_path.open("a")
    t_start, n_seen = time.perf_counter(), 0
    for f in read_corpus(args.corpus):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        views = [x for r in f.labelled if (x := answer_view(r, "primary", tok)) is not None]
        views = [x for x in views[args.skip : args.skip + args.per_cell] if x.references]
        if not views:
            continue
        examples = {ex.uid: ex for ex in load_task_records(task, seed=0)}
        post = postprocess_for(style)
        gen_kw = {"max_new_tokens": int(f.header["decoding"]["max_new_tokens"]), "eos_token_id": eos}
        if style.startswith("plain"):
            gen_kw.update(newline_stop_kwargs(tok))
        for x in views:
            uid = f"{task}/{style}/{x.uid}"
            todo = [j for j in jobs if (uid, j[0], j[2]) not in done]
            if (uid, None, None) in done and not todo:
                continue
            ex = examples[x.uid]

            def judged(gen: list[int], ex=ex, post=post) -> tuple[int | None, str]:
                text = post(tok.decode([t for t in gen if t not in eos], skip_special_tokens=True))
                return judge_answer(ex, text).label, text

            ids = torch.tensor([encode_text(tok, x.prompt)])
            p = ids.shape[1]
            row_kw = bind_prompt_width(gen_kw, p)
            t0 = time.perf_counter()
            out = fc.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), **row_kw, do_sample=False,
                return_flow_scores=True, output_logits=True, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
            t_gen = time.perf_counter() - t0
            gen = [t for t in out.sequences[0, p:].tolist() if t not in eos]
            label, text = judged(gen)
            score = float(out.flow_scores[0])
            flagged = bool(out.flow_has_events[0]) and score > threshold
            n_seen += 1
            if (uid, None, None) not in done:
                base = {
                    "uid": uid, "config": None, "decoding": None, "label": label, "file_label": x.label,
                    "same_as_file": gen[: len(x.gen_ids)] == list(x.gen_ids), "answer": text, "score": score,
                    "flagged": flagged, "threshold": threshold, "gen_s": t_gen, "n_new": len(gen),
                }  # fmt: skip
                fh.write(json.dumps(base) + "\n")
                fh.flush()
            if not flagged:
                continue
            t_cur = out.sequences.shape[1] - 1
            for cname, fields, dname, dec in todo:
                kw = dict(fields)
                pointer = kw.pop("pointer", "culprit")
                kw.setdefault("seed", _seed_of(uid))
                kw.setdefault("rescore", int(kw.get("num_culprits", 1)) > 1)
                src = out
                if pointer == "lowest_prob":
                    low = _lowest_prob_culprit(out, p)
                    if low is None:
                        continue
                    src = copy.copy(out)
                    src.flow_culprits = torch.tensor([low])
                elif pointer != "culprit":
                    raise SystemExit(f"--configs {cname}: pointer={pointer!r}; use culprit or lowest_prob.")
                t1 = time.perf_counter()
                res = fc.refine(src, rows=[0], **kw, **row_kw, **dec)
                dt = time.perf_counter() - t1
                row = {"uid": uid, "config": cname, "decoding": dname, "label_before": label}
                if res.rows:
                    r = res.rows[0]
                    new_gen = [t for t in r.refined_answer_ids if t not in eos]
                    new_label, new_text = judged(new_gen)
                    t_roll = r.culprit_before[0]
                    n_orig = max(1, out.sequences.shape[1] - p)
                    steps = len(r.refined_answer_ids) - (t_roll + 1 - p)
                    row.update(
                        label_after=new_label, changed=new_gen != gen, answer_after=new_text,
                        score_after=r.score_after, positions_clamped=r.positions_clamped,
                        positions_patched=r.positions_patched, mean_lambda=r.mean_lambda,
                        time_ratio=1 + dt / t_gen, step_ratio=1 + steps * r.candidates / n_orig,
                        bound=1 + (t_cur - t_roll) / n_orig * r.candidates, candidates=r.candidates,
                    )  # fmt: skip
                else:
                    row["skipped"] = res.skipped.get(0)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            if n_seen % 10 == 0:
                print(f"{n_seen} answers ({task}/{style}), {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    fh.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fresh_options(p, per_cell=12)
    p.set_defaults(out=None)
    p._option_string_actions["--out"].required = False
    p.add_argument("--corpus", default="answers/SmolLM2-135M-Instruct/corpus")
    p.add_argument("--threshold", type=float, default=None, help="Default: the validator's recommended_threshold().")
    p.add_argument("--configs", nargs="+", default=["flow@sample:0.7", "regenerate@sample:0.7", "resample@sample:0.7"])
    p.add_argument("--summary", default=None, help="Print the table of this JSONL and exit.")
    p.add_argument("--summary-json", default=None, help="Also write the summary here.")
    p.add_argument("--operating-point", default=None,
                   help="--summary: only answers above the validator's threshold for this point (e.g. precision_0.9).")  # fmt: skip
    args = p.parse_args(argv)
    if args.summary:
        min_score = None
        if args.operating_point:
            _, _, v = load_fresh(args)
            min_score = v.recommended_threshold(args.operating_point)
            print(f"answers above the validator's {args.operating_point} threshold, {min_score:.3f}")
        out = summarize(args.summary, None, min_score)
        out["command"] = "python benchmarks/refinement_corpus.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.summary_json:
            Path(args.summary_json).write_text(json.dumps(out, indent=1))
        return 0
    if not args.out:
        raise SystemExit("give --out (the JSONL the rows are appended to), or --summary.")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
