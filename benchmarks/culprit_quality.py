"""Does the culprit point at the wrong words? Weak token labels on corpus answers no validator saw.

For the next ``--per-cell`` labelled answers of every corpus cell after ``--skip`` (the bundled corpus
validators were fitted on each cell's first 100 at most), each answer is teacher-forced once with
the validator's own ``FlowConfig`` and once plainly (hidden states and token log-probs). In a
hallucinated answer, a word token that is in no reference answer is *wrong-part*, one that is in a
reference is *supported* (:func:`~hf_flowcheck.workflows.token_labels.word_labels`, rule
``"references"``; tokens without word characters and special tokens are unlabelled). Only answers
with at least one token of each kind count.

Pointers compared, each naming one answer token:

- ``random token``: the expected hit rate of a uniformly drawn scored token (the share of wrong-part
  tokens among them);
- ``lowest-probability token``: the token with the largest ``-log p``;
- ``arg-max event``: the column of the validator's largest event logit (the culprit up to session 18);
- ``validator's culprit``: ``FlowValidatorOutput.culprit_column`` of the code that runs (since
  session 20 the riskiest token with a word character, the same as ``riskiest word token``);
- ``arg-max flow token``: the column of the largest token logit of the flow part alone
  (``token_logits`` without any state term);
- ``arg-max state contribution`` (flow + mean-state validators): the token whose own residual at the
  state block adds most to the state term. The state term is linear in the answer's mean residual,
  ``w·(mean_t h_t − shift)/scale + b``, so it is exactly the mean over tokens of
  ``c_t = w·(h_t − shift)/scale + b``;
- ``riskiest word token``: the arg-max token logit among tokens with a word character (no
  punctuation), computed here from the tokenizer as a check on the library's rule;
- ``arg-max token risk``: the column of ``token_logits`` where the constant state term is replaced by
  the token's own ``c_t`` (what ``FlowValidatorOutput.token_logits`` reads with per-token states).

Every pointer chooses among the answer tokens the validator scores (content tokens: no terminator);
landing on an unlabelled one counts as a miss, and how often that happens is reported. Reported:
the share of answers whose pointer lands on a wrong-part token (95% bootstrap interval over answers), each pointer's paired difference to the lowest-probability token, and the per-answer
localization AUROC (wrong-part against supported tokens within an answer, averaged).

``--spans`` reads HaluQuestQA's expert error spans instead (``benchmarks/human_spans.py`` selects,
teacher-forces and labels the answers the same way: one chat-template user turn, the first 192
answer tokens, answers whose spans all lie inside the cut). There, without the flow part (its token
risks are in that benchmark's report), the state contribution ``c_t`` is compared with the token's
``-log p`` and entropy: all-token AUROC, per-answer localization, and how often each one's riskiest
token lies in an error span.

Run: ``python benchmarks/culprit_quality.py --model SmolLM2-135M-Instruct
--corpus answers/SmolLM2-135M-Instruct/corpus --skip 100 --per-cell 8 --basis-solver subspace
--out benchmarks/results/culprit_quality_smol.json`` and ``python benchmarks/culprit_quality.py --spans
--out benchmarks/results/culprit_quality_spans_smol.json``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fresh_answers import add_fresh_options, load_fresh  # a sibling benchmark: the same fresh answers

from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.metrics import auroc
from hf_flowcheck.workflows.corpus import answer_view, read_corpus
from hf_flowcheck.workflows.token_labels import question_of, word_labels, words


def _labels(tok, gen_ids: list[int], references: list[str], prompt: str) -> np.ndarray:
    """``[len(gen_ids)]`` 1 wrong-part, 0 supported, ``nan`` unlabelled (one hallucinated answer)."""
    question = question_of(prompt)
    out = np.full(len(gen_ids), np.nan)
    for j, t in enumerate(gen_ids):
        w = words(tok.decode([t], skip_special_tokens=True))
        marks = [m for m in word_labels(w, references, question, "references") if m is not None] if w else []
        if marks:
            out[j] = float(any(marks))
    return out


def _mean_state_block(v: FlowValidator) -> int | None:
    """The state block of a flow + mean-state validator, else ``None``."""
    if v.config.state_dim and v.flow_config.state_summary == "mean":
        (blk,) = v.config.state_blocks
        return blk
    return None


def _plain_pass(model, v: FlowValidator, ids: torch.Tensor, start: int, blk: int | None) -> tuple:
    """One plain forward of ``ids [1, S]``: per answer token (from ``start``) ``-log p``, entropy and,
    with ``blk``, the state contribution ``c_t = w·(h_t − shift)/scale + b`` (``None`` without)."""
    with torch.inference_mode():
        o = model(ids, output_hidden_states=blk is not None)
        logp = torch.log_softmax(o.logits[0, start - 1 : -1].float(), -1)
        nll = -logp.gather(-1, ids[0, start:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        c = None
        if blk is not None:
            h = o.hidden_states[blk][0, start:].float()
            c = (((h - v.state_shift[0]) / v.state_scale[0]) @ v.state_head.weight[0] + v.state_head.bias).numpy()
    return nll.numpy(), entropy.numpy(), c


def _answer_pointers(model, ext: FlowExtractor, v: FlowValidator, prompt: list[int], gen: list[int]) -> dict | None:
    """Each pointer's per-answer-token score (``nan`` where it has none), indexed like ``gen``."""
    ids = torch.tensor([prompt + gen])
    resp = torch.zeros_like(ids)
    resp[:, len(prompt) :] = 1
    f = ext.extract(ids, response_mask=resp)
    if not bool(f.valid.any()):
        return None
    o = v.score_features(f)
    cols = f.positions[0] - len(prompt)  # [T] answer-token index of each column
    n = len(gen)

    def per_token(col_scores: torch.Tensor) -> np.ndarray:
        out = np.full(n, np.nan)
        out[cols.numpy()] = col_scores.detach().float().numpy()
        return out

    state_term = 0.0
    blk = _mean_state_block(v)
    nll, _, c = _plain_pass(model, v, ids, len(prompt), blk)
    if blk is not None:
        with torch.inference_mode():
            z = (f.states[:, [blk]].float() - v.state_shift) / v.state_scale
            state_term = float(v.state_head(z.reshape(1, -1)).squeeze())
    flow_tok = per_token(o.token_logits[0] - state_term)
    ev = o.event_logits[0].detach().float()  # [B, T], -inf where no event
    event = np.full(n, np.nan)
    event[int(cols[int(ev.max(0).values.argmax())])] = 1.0
    culprit = np.full(n, np.nan)
    culprit[int(cols[o.culprit_column[0]])] = 1.0
    out = {"lowest-probability token": nll, "arg-max event": event, "validator's culprit": culprit,
           "arg-max flow token": flow_tok}  # fmt: skip
    if c is not None:
        c_np = c
        mask = ~np.isnan(flow_tok)
        out["arg-max state contribution"] = np.where(mask, c_np, np.nan)
        out["arg-max token risk"] = flow_tok + c_np
    return out


def _summary(hits: dict[str, np.ndarray], base: str, rng: np.random.Generator, n_boot: int) -> dict:
    n = len(hits[base])
    idx = rng.integers(0, n, (n_boot, n))
    out = {}
    for k, h in hits.items():
        boot = h[idx].mean(1)
        row = {
            "on_wrong_part": round(float(h.mean()), 3),
            "ci": [round(float(x), 3) for x in np.percentile(boot, [2.5, 97.5])],
        }
        if k != base:
            diff = (h - hits[base])[idx].mean(1)
            row[f"minus {base}"] = [round(float(x), 3) for x in np.percentile(diff, [2.5, 97.5])]
        out[k] = row
    return out


def _spans(args: argparse.Namespace, model, tok, v: FlowValidator) -> dict:
    """The state contribution against ``-log p`` and entropy on HaluQuestQA's expert error spans."""
    from human_spans import DATA, label_tokens, read_answers  # a sibling benchmark: the same answers and labels

    blk = _mean_state_block(v)
    if blk is None:
        raise SystemExit("--spans compares a flow + mean-state validator's state contribution; this one has none.")
    rows = []
    for rec in read_answers(DATA, args.clean, 0):
        prompt = tok.apply_chat_template([{"role": "user", "content": rec["question"]}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        enc = tok(rec["answer"], add_special_tokens=False, return_offsets_mapping=True)
        labels, _, complete = label_tokens(rec, [tuple(o) for o in enc.offset_mapping[:192]])
        if not complete:
            continue
        ids = torch.tensor([p_ids + enc.input_ids[:192]])
        nll, entropy, c = _plain_pass(model, v, ids, len(p_ids), blk)
        rows.append((np.array(labels, float), {"state contribution": c, "-log p": nll, "entropy": entropy}))
    out: dict = {"answers": len(rows), "with_error": int(sum(y.any() for y, _ in rows))}
    y_all = np.concatenate([y for y, _ in rows])
    hits: dict[str, list[float]] = {"random token": []}
    for name in rows[0][1]:
        s_all = np.concatenate([s[name] for _, s in rows])
        mixed = [(y, s[name]) for y, s in rows if 0 < y.sum() < len(y)]
        hits[name] = [float(y[int(np.argmax(s_))]) for y, s_ in mixed]
        out[name] = {"all_token_auroc": round(auroc(y_all, s_all), 3),
                     "per_answer_localization": round(float(np.mean([auroc(y, s_) for y, s_ in mixed])), 3)}  # fmt: skip
    hits["random token"] = [float(y.mean()) for y, s in rows if 0 < y.sum() < len(y)]
    arrays = {k: np.array(h) for k, h in hits.items()}
    out["riskiest token in an error span"] = _summary(arrays, "-log p", np.random.default_rng(0), args.bootstrap)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_fresh_options(p, per_cell=8)
    p.add_argument("--corpus", help="The corpus folder (answers/<model>/corpus); not with --spans.")
    p.add_argument("--spans", action="store_true", help="HaluQuestQA's expert error spans instead of the corpus.")
    p.add_argument("--clean", type=int, default=236, help="--spans: answers without an error span to add.")
    p.add_argument("--bootstrap", type=int, default=2000)
    args = p.parse_args(argv)
    model, tok, v = load_fresh(args)
    command = "python benchmarks/culprit_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.spans:
        out = {"validator": str(args.validator or "bundled default"), "command": command, **_spans(args, model, tok, v)}
        print(json.dumps(out, indent=1))
        Path(args.out).write_text(json.dumps(out, indent=1))
        return 0
    if not args.corpus:
        raise SystemExit("give --corpus (answers/<model>/corpus), or --spans.")
    ext = FlowExtractor(model, v.flow_config, tokenizer=tok)
    t0 = time.perf_counter()
    hits: dict[str, list[float]] = {}
    loc: dict[str, list[float]] = {}
    unlabelled: dict[str, list[float]] = {}
    cells: list[str] = []
    for f in read_corpus(args.corpus):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        views = [x for r in f.labelled if (x := answer_view(r, "primary", tok)) is not None]
        for x in views[args.skip : args.skip + args.per_cell]:
            if not x.label or not x.references:
                continue
            y = _labels(tok, list(x.gen_ids), list(x.references), x.prompt)
            prompt = encode_text(tok, x.prompt)
            ptr = _answer_pointers(model, ext, v, prompt, list(x.gen_ids))
            if ptr is None:
                continue
            wordy = np.array([bool(words(tok.decode([t], skip_special_tokens=True))) for t in x.gen_ids])
            ptr["riskiest word token"] = np.where(wordy, ptr["arg-max flow token"], np.nan)
            scored = ~np.isnan(ptr["arg-max flow token"])  # the tokens the validator can point at
            usable = scored & ~np.isnan(y)
            if not (0 < y[usable].sum() < usable.sum()):
                continue
            cells.append(f"{task}/{style}")
            wrong = np.where(np.isnan(y), 0.0, y)  # an unlabelled token (punctuation, a number's piece) is no hit
            hits.setdefault("random token", []).append(float(wrong[scored].mean()))
            for k, s in ptr.items():
                j = int(np.argmax(np.where(scored, np.nan_to_num(s, nan=-np.inf), -np.inf)))
                hits.setdefault(k, []).append(float(wrong[j]))
                unlabelled.setdefault(k, []).append(float(np.isnan(y[j])))
                if k not in ("arg-max event", "validator's culprit"):
                    loc.setdefault(k, []).append(auroc(y[usable], s[usable]))
        print(f"{task}/{style}: {len(cells)} answers so far, {time.perf_counter() - t0:.0f} s", flush=True)
    arrays = {k: np.array(h) for k, h in hits.items()}
    out = {
        "validator": str(args.validator or "bundled default"),
        "answers": len(cells),
        "skip": args.skip,
        "per_cell": args.per_cell,
        "seconds": round(time.perf_counter() - t0),
        "command": command,
        "pointers": _summary(arrays, "lowest-probability token", np.random.default_rng(0), args.bootstrap),
        "per_answer_localization": {k: round(float(np.mean(v_)), 3) for k, v_ in loc.items()},
        "share_on_an_unlabelled_token": {k: round(float(np.mean(v_)), 3) for k, v_ in unlabelled.items()},
        "cells": sorted(set(cells)),
    }
    print(json.dumps(out["pointers"], indent=1), json.dumps(out["per_answer_localization"]))
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
