"""Does a hidden-state probe pooled over the answer's tokens transfer across prompt styles and tasks?

Issue 25 asks for a score that holds on prompt styles and tasks it was not trained on. The flow
features plus token confidence reach 0.715 (SmolLM2) / 0.736 (Qwen) over held-out styles; the
probe on the residual at the last answer token transferred worse (0.667). Published probes that
transfer pool over the answer's tokens at a middle depth; this script measures that here.

``extract``  one teacher-forced forward per labelled corpus answer (its primary view, as
             ``corpus_transfer.py replay`` reads it), writing per (task, style) cell, at every
             depth: the residual state averaged over the answer's content tokens (the runtime's
             token mask: no terminators), the state at the last content token, and the state at
             the last prompt token (before the answer); plus the answer's token confidence over the
             same tokens (-mean log p, -min log p, mean entropy). Resumable per cell.
``matrix``   leave-one-out over prompt styles and tasks (TruthfulQA never trained on): on the other
             cells, a seeded 85/15 split grouped by question picks the pooling, depth and L2 of a
             logistic probe by validation AUROC; the probe is refitted on train and scores the
             held-out cell. Designs: ``probe`` (the pooled state), ``probe+confidence`` (the pooled
             state and the three confidence numbers), ``confidence`` (the three numbers alone).
             Each cell's AUROC with a 95% bootstrap interval beside -mean log p and -min log p, and
             the paired interval of each design against -min log p.

Commands (docs/results.md, "A probe pooled over the answer's tokens"):

    python benchmarks/pooled_state_probe.py extract --model SmolLM2-135M-Instruct \
        --corpus answers/SmolLM2-135M-Instruct/corpus --out runs/pooled/smol
    python benchmarks/pooled_state_probe.py matrix --states runs/pooled/smol \
        --out benchmarks/results/pooled_state_probe_smol.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from hf_flowcheck.data.corpus import CORPUS_TASKS, PROMPT_STYLES
from hf_flowcheck.detectors.base import ScoredExample, batch_examples, encode_text
from hf_flowcheck.detectors.baselines import train_logistic_regression
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.metrics import auroc, bootstrap_ci, paired_auroc_difference
from hf_flowcheck.model_io import pad_token_id
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.readout import token_confidence_summary
from hf_flowcheck.workflows.corpus import answer_view, read_corpus

POOLINGS = ("mean", "last", "prompt")
DESIGNS = ("probe", "probe+confidence", "confidence")


@torch.inference_mode()
def _states(model, ext: FlowExtractor, batch: list[ScoredExample], pad: int) -> dict[str, torch.Tensor]:
    """One forward of ``batch``: pooled states ``[n, B+1, d]`` (float16) and confidence ``[n, 3]``."""
    ids, att, resp = batch_examples(batch, pad)
    mask = ext.token_mask(ids, att, resp)  # [n, S] the scored content tokens
    out = model.model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    hs = torch.stack(out.hidden_states, dim=1)  # [n, B+1, S, d]; the last is after the final norm
    n = len(batch)
    w = mask.float()
    cnt = w.sum(1).clamp_min(1)
    mean = torch.einsum("ns,nbsd->nbd", w, hs.float()) / cnt[:, None, None]
    last_pos = torch.where(mask.any(1), (mask * torch.arange(mask.shape[1])).argmax(1), att.sum(1) - 1)
    rows = torch.arange(n)
    prompt_pos = torch.tensor([len(e.prompt_ids) - 1 for e in batch])
    conf = torch.full((n, 3), float("nan"))
    pred = torch.zeros_like(mask)
    pred[:, :-1] = mask[:, 1:]  # the position whose output chose each scored token
    for i in range(n):
        p = pred[i].nonzero().squeeze(1)
        if len(p) == 0:
            continue
        logp = torch.log_softmax(model.lm_head(hs[i, -1, p]).float(), -1)  # hidden_states[-1] is after the final norm
        per_token = torch.stack([logp.gather(1, ids[i, p + 1, None]).squeeze(1), -(logp.exp() * logp).sum(-1)], 1)
        conf[i] = token_confidence_summary(per_token)
    return {
        "mean": mean.half(),
        "last": hs[rows, :, last_pos].half(),
        "prompt": hs[rows, :, prompt_pos].half(),
        "confidence": conf,
        "content_tokens": mask.sum(1),
    }


def extract(args: argparse.Namespace) -> int:
    """Every labelled answer of every cell not written yet (one file per cell)."""
    model, tok = load_model(args.model)
    model.eval()
    ext = FlowExtractor(model, dataclasses.replace(FlowExtractor(model).config, score_terminators=False), tokenizer=tok)
    pad = pad_token_id(model, eos_fallback=True, default=0)
    root = Path(args.out)
    for f in read_corpus(args.corpus, tasks=args.tasks):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        path = root / task / f"{style}.safetensors"
        if path.is_file():
            continue
        views = [v for r in f.labelled if (v := answer_view(r, "primary", tok)) is not None]
        views = views[: args.max_per_cell] if args.max_per_cell else views  # the files are in a seeded order
        if not views:
            continue
        t0 = time.perf_counter()
        # Sorted by length so a batch pads little; written back in file order.
        ex = [ScoredExample(encode_text(tok, v.prompt), list(v.gen_ids), v.label, v.uid) for v in views]
        order = sorted(range(len(ex)), key=lambda i: ex[i].length)
        parts: dict[str, list[torch.Tensor]] = {}
        for s in range(0, len(order), args.batch_size):
            for k, t in _states(model, ext, [ex[i] for i in order[s : s + args.batch_size]], pad).items():
                parts.setdefault(k, []).append(t)
        back = torch.argsort(torch.tensor(order))
        tensors = {k: torch.cat(v)[back].contiguous() for k, v in parts.items()}
        tensors["labels"] = torch.tensor([int(v.label) for v in views])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"uids": json.dumps([v.uid for v in views]), "model": args.model})
        tmp.replace(path)
        print(f"{task}/{style}: {len(views)} answers, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def load(root: Path, max_per_cell: int | None = None) -> dict:
    """Every cell (its first ``max_per_cell`` answers), concatenated: tensors plus ``task``, ``style``, ``uid``."""
    from safetensors import safe_open

    cols: dict[str, list] = {}
    for path in sorted(root.glob("*/*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            uids = json.loads(fh.metadata()["uids"])[:max_per_cell]
        for k, t in load_file(str(path)).items():
            cols.setdefault(k, []).append(t[: len(uids)])
        cols.setdefault("task", []).append(np.array([path.parent.name] * len(uids)))
        cols.setdefault("style", []).append(np.array([path.stem] * len(uids)))
        cols.setdefault("uid", []).append(np.array(uids))
    return {k: (np.concatenate(v) if isinstance(v[0], np.ndarray) else torch.cat(v)) for k, v in cols.items()}


def _fit_score(x: torch.Tensor, y: np.ndarray, tr: np.ndarray, l2: float) -> np.ndarray:
    """Standardize on ``tr``, fit a logistic regression there, score every row."""
    x = x.double()
    mu, sd = x[tr].mean(0), x[tr].std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w, b = train_logistic_regression(z[tr], torch.as_tensor(y[tr]), l2=l2)
    return torch.sigmoid(z @ w + b).numpy()


def _design_inputs(data: dict, design: str, pooling: str, depth: int) -> torch.Tensor:
    conf = torch.nan_to_num(data["confidence"].double())
    if design == "confidence":
        return conf
    x = data[pooling][:, depth].double()
    return torch.cat([x, conf], 1) if design == "probe+confidence" else x


def select_and_score(
    data: dict, y: np.ndarray, idx: np.ndarray, design: str, seed: int, depths, l2s, where: tuple | None = None
) -> tuple:
    """Pick (pooling, depth, l2) on a grouped 85/15 split of ``idx``; refit on its 85%; score all rows.

    ``where=(pooling, depth)`` fixes the state read (``probe+confidence`` reuses the probe's) and picks l2 alone.
    """
    groups = np.unique(data["uid"][idx])
    rng = np.random.default_rng(seed)
    val_groups = set(rng.permutation(groups)[: max(1, len(groups) * 15 // 100)].tolist())
    is_val = np.array([u in val_groups for u in data["uid"][idx]], dtype=bool)
    tr, va = idx[~is_val], idx[is_val]
    if design == "confidence":
        grid = [("-", 0, l2) for l2 in l2s]
    elif where is not None:
        grid = [(*where, l2) for l2 in l2s]
    else:
        grid = [(p, d, l2) for p in POOLINGS for d in depths for l2 in l2s]
    best, best_auc = None, -1.0
    for p, d, l2 in grid:
        s = _fit_score(_design_inputs(data, design, p, d), y, tr, l2)
        a = auroc(y[va], s[va])
        if a > best_auc:
            best, best_auc = (p, d, l2), a
    p, d, l2 = best
    return _fit_score(_design_inputs(data, design, p, d), y, tr, l2), {
        "pooling": p, "depth": d, "l2": l2, "val_auroc": round(best_auc, 3),
    }  # fmt: skip


def _ci(y, s) -> dict:
    lo, hi = bootstrap_ci(auroc, y, s, n=500)
    return {"auroc": round(auroc(y, s), 3), "ci": [round(lo, 3), round(hi, 3)]}


def _within_task_mean(y: np.ndarray, task: np.ndarray, cols: dict[str, np.ndarray]) -> dict:
    """Mean over the tasks with both labels (and at least 20 answers) of each column's AUROC within the task."""
    tasks = [t for t in np.unique(task) if (task == t).sum() >= 20 and len(set(y[task == t].tolist())) == 2]
    out = {k: round(float(np.mean([auroc(y[task == t], v[task == t]) for t in tasks])), 3) for k, v in cols.items()}
    return {"tasks": len(tasks), **out}


def flow_matrix_scores(scores_path: str, features_root: str) -> dict[str, dict[tuple, float]]:
    """``corpus_transfer.py matrix`` scores by held-out run: ``{run: {(task, style, uid): score}}``."""
    from corpus_transfer import load_cells  # a sibling benchmark: its store order gives each score's cell

    saved = json.loads(Path(scores_path).read_text())
    _, _, meta = load_cells(Path(features_root), features=False)
    keys = [(m[0], m[1], m[2]) for m in meta]
    if [k[2] for k in keys] != saved["uids"]:
        raise ValueError(f"{scores_path} was not scored on the answers now in {features_root}; re-run its matrix.")
    return {run: {keys[i]: r["scores"][i] for i in r["test"]} for run, r in saved["runs"].items()}


def matrix(args: argparse.Namespace) -> int:
    data = load(Path(args.states), args.max_per_cell)
    flow = {}
    for spec in args.compare or []:
        scores_path, _, root = spec.partition(":")
        for run, by_key in flow_matrix_scores(scores_path, root).items():
            flow.setdefault(run, {}).update(by_key)
    y = data["labels"].numpy().astype(int)
    task, style = data["task"], data["style"]
    n_depth = data["mean"].shape[1]
    depths = list(range(0, n_depth, args.depth_step))
    ok = (data["content_tokens"] > 0).numpy()
    trainable = ok & ~np.isin(task, [t for t, spec in CORPUS_TASKS.items() if spec.eval_only])
    conf = data["confidence"].numpy()
    cells = [("style", s, style == s) for s in PROMPT_STYLES] + [("task", t, task == t) for t in CORPUS_TASKS]
    out: dict = {"states": args.states, "answers": int(ok.sum()), "depths": n_depth, "cells": {}}
    for kind, name, held in cells:
        held = held & ok
        train = np.flatnonzero(trainable & ~held)
        if held.sum() < 20 or len(set(y[held].tolist())) < 2 or len(set(y[train].tolist())) < 2:
            continue
        t0 = time.perf_counter()
        yt = y[held]
        row: dict = {"n": int(held.sum()), "hallucinated": int(yt.sum())}
        row["-mean log p"] = _ci(yt, conf[held, 0])
        row["-min log p"] = _ci(yt, conf[held, 1])
        row["mean entropy"] = _ci(yt, conf[held, 2])
        where, scored = None, {}
        for design in args.designs:
            s, chosen = select_and_score(data, y, train, design, args.seed, depths, args.l2, where)
            if design == "probe":
                where = (chosen["pooling"], chosen["depth"])
            scored[design] = s[held]
            row[design] = {**_ci(yt, s[held]), **chosen}
            lo, hi = paired_auroc_difference(yt, s[held], conf[held, 1], n=500)
            row[design]["minus -min log p"] = [round(lo, 3), round(hi, 3)]
        if kind == "style":
            # A held-out style mixes tasks of very different hallucination rates; a score that only recognises
            # the task ranks well across them. The mean AUROC within each task of the cell removes that.
            cols = {"-mean log p": conf[held, 0], "-min log p": conf[held, 1], **scored}
            row["within-task mean"] = _within_task_mean(yt, task[held], cols)
        if f"{kind}={name}" in flow:  # the flow design on the answers both were scored on
            by_key = flow[f"{kind}={name}"]
            keys = list(zip(task[held], style[held], data["uid"][held], strict=True))
            both = np.array([k in by_key for k in keys], dtype=bool)
            if both.sum() >= 20 and len(set(yt[both].tolist())) == 2:
                fs = np.array([by_key[k] for k, b in zip(keys, both, strict=True) if b])
                shared = {"n": int(both.sum()), "flow": round(auroc(yt[both], fs), 3)}
                for design, sd in scored.items():
                    lo, hi = paired_auroc_difference(yt[both], sd[both], fs, n=500)
                    shared[design] = round(auroc(yt[both], sd[both]), 3)
                    shared[f"{design} - flow"] = [round(lo, 3), round(hi, 3)]
                if kind == "style":
                    cols = {"flow": fs, **{d: sd[both] for d, sd in scored.items()}}
                    shared["within-task mean"] = _within_task_mean(yt[both], task[held][both], cols)
                row["flow design, shared answers"] = shared
        out["cells"][f"{kind}={name}"] = row
        print(f"{kind}={name}: n={row['n']} " + " ".join(
            f"{k}={row[k]['auroc']}" for k in ("-mean log p", "-min log p", *args.designs)
        ) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
        Path(args.out).write_text(json.dumps(out, indent=1))
    for kind in ("style", "task"):
        rows = [r for k, r in out["cells"].items() if k.startswith(kind + "=") and k != "task=truthfulqa"]
        if not rows:
            continue
        out[f"mean over held-out {kind}s"] = {
            k: round(float(np.mean([r[k]["auroc"] for r in rows])), 3) for k in ("-mean log p", "-min log p", *args.designs)
        }  # fmt: skip
        if kind == "style":
            out["mean over held-out styles, within task"] = {
                k: round(float(np.mean([r["within-task mean"][k] for r in rows])), 3)
                for k in ("-mean log p", "-min log p", *args.designs)
            }  # fmt: skip
        print(kind, out[f"mean over held-out {kind}s"], flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="Pooled residual states and token confidence per corpus answer (resumable).")
    ex.add_argument("--model", required=True)
    ex.add_argument("--corpus", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--tasks", nargs="*", default=None)
    ex.add_argument("--max-per-cell", type=int, default=None, help="Only each cell's first N labelled answers.")
    ex.add_argument("--batch-size", type=int, default=8)
    ex.add_argument("--threads", type=int, default=None)
    mx = sub.add_parser("matrix", help="Leave-one-style/task-out probes against token confidence.")
    mx.add_argument("--states", required=True)
    mx.add_argument("--out", required=True)
    mx.add_argument("--designs", nargs="+", default=list(DESIGNS), choices=DESIGNS)
    mx.add_argument("--depth-step", type=int, default=2)
    mx.add_argument("--l2", type=float, nargs="+", default=[1e-2, 1.0])
    mx.add_argument("--seed", type=int, default=0)
    mx.add_argument(
        "--max-per-cell", type=int, default=None, help="Only each cell's first N answers (a learning curve)."
    )
    mx.add_argument("--compare", nargs="*", metavar="SCORES:FEATURES",
                    help="corpus_transfer.py matrix score files (with their feature root) to compare on shared answers.")  # fmt: skip
    mx.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return extract(args) if args.cmd == "extract" else matrix(args)


if __name__ == "__main__":
    raise SystemExit(main())
