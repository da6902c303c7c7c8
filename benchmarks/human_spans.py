"""Token-level risk against human error spans (HaluQuestQA), teacher-forced through a model.

HaluQuestQA (``../shared/data/haluquestqa``, see its SOURCE.md) holds 698 long-form questions, each
with a human and a GPT-4 answer, and 283 factuality error spans marked by domain experts (character
offsets). Each answer is teacher-forced after the question, asked through the model's chat template
(one user turn, the answer as the assistant's reply), and every answer token gets a label: 1 if it
overlaps an expert's error span, else 0. Answers are cut at ``--max-answer-tokens``; an answer whose
spans are not all located inside the cut (the source could not place 3 spans) is left out of the
token-level metrics, because its unlabelled error tokens would count as supported.

``extract`` writes, per shard of answers (resumable), what every token-level detector reads:

- the token's ``-log p`` and the entropy of the distribution that predicted it (one plain forward);
- the residual stream at the token at three depths (``L/4``, ``L/2``, ``3L/4``), for per-token probes
  (the method of the token-level entity probes: a linear probe on a middle layer);
- with ``--flow``, the flow features of every answer token (the default validator's recipe, its
  token-confidence states included), for the flow token head and the bundled validator's token risk.

``evaluate`` runs five folds grouped by question (an answer and its sibling stay together; the next
fold is the validation fold of each run) and reports, on every answer once held out:

- **all-token AUROC** (error tokens against every other token, pooled), with an interval from a
  bootstrap over answers, and **recall at 10% false-positive rate**;
- **sentence-max AUROC** (the span-max metric of the entity probes, with sentences as the units: a
  sentence's score is its riskiest token; sentences that overlap an error span against the rest);
- **per-answer localization** in answers with an error: the AUROC of error against other tokens
  within the answer, averaged; and how often the riskiest token lies in an error span (against the
  share of error tokens, what a random token would hit);
- paired intervals (bootstrap over answers) of each detector minus ``-log p`` and minus entropy.

Detectors: token ``-log p`` and entropy (lm-polygraph's token-level estimators
``MaximumTokenProbability``/``TokenEntropy`` are these two quantities); a per-token logistic probe
on the residual (depth and L2 chosen on the validation fold); with ``--flow`` stores, the flow token
head (the streaming design: attention head, no state branch, trained with the token loss on these
labels) and the bundled default validator's own token risks (not trained on these answers); and a
stacked combination (a logistic regression on the standardised scores, fitted on the validation fold).

Run::

    python benchmarks/human_spans.py extract --model SmolLM2-135M-Instruct --out runs/hqqa/smol --flow \\
        --clean 236
    python benchmarks/human_spans.py evaluate --store runs/hqqa/smol --out benchmarks/results/human_spans_smol.json
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hf_flowcheck import FlowExtractor
from hf_flowcheck.bundled import bundled_validators, default_validator_for
from hf_flowcheck.detectors import FlowValidator, ValidatorConfig
from hf_flowcheck.detectors.baselines import train_logistic_regression
from hf_flowcheck.features import FlowFeatures, pad_features
from hf_flowcheck.metrics import auroc
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.token_labels import sentence_of_tokens, span_token_labels
from hf_flowcheck.workflows.training import train_validator

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "haluquestqa" / "haluquestqa_factuality_spans.jsonl"


def read_answers(path: Path, clean: int, seed: int) -> list[dict]:
    """Every answer with an error span, and ``clean`` seeded answers without one (their siblings first)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    bad = [r for r in rows if r["has_factuality_error"]]
    bad_q = {r["id"].rsplit("-", 1)[0] for r in bad}
    siblings = [r for r in rows if not r["has_factuality_error"] and r["id"].rsplit("-", 1)[0] in bad_q]
    others = [r for r in rows if not r["has_factuality_error"] and r["id"].rsplit("-", 1)[0] not in bad_q]
    rng = np.random.default_rng(seed)
    pool = [siblings[i] for i in rng.permutation(len(siblings))] + [others[i] for i in rng.permutation(len(others))]
    keep = {r["id"] for r in bad + pool[:clean]}
    return [r for r in rows if r["id"] in keep]


def label_tokens(record: dict, offsets: list[tuple[int, int]]) -> tuple[list[int], list[int], bool]:
    """``(token labels, sentence index per token, complete)`` of one answer's kept tokens."""
    spans = [None if s["start"] is None else (s["start"], s["end"]) for s in record["factuality_error_spans"]]
    labels, complete = span_token_labels(offsets, spans)
    return labels, sentence_of_tokens(record["answer"], offsets), complete


def extract(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    records = read_answers(Path(args.data), args.clean, args.seed)
    n_layers = model.config.num_hidden_layers
    depths = [n_layers // 4, n_layers // 2, (3 * n_layers) // 4]
    ext = None
    if args.flow:
        shipped = default_validator_for(model)
        cfg = dataclasses.replace(shipped.flow_config, lens_features=False, score_terminators=False)
        ext = FlowExtractor(model, cfg, tokenizer=tok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").write_text(json.dumps({"model": args.model, "depths": depths, "flow": bool(args.flow),
                                               "max_answer_tokens": args.max_answer_tokens, "clean": args.clean,
                                               "seed": args.seed, "records": len(records)}))  # fmt: skip
    t_start = time.perf_counter()
    for first in range(0, len(records), args.shard_size):
        path = out / f"shard-{first:05d}.safetensors"
        if path.is_file():
            continue
        tensors, rows = {}, []
        for i, rec in enumerate(records[first : first + args.shard_size]):
            messages = [{"role": "user", "content": rec["question"]}]
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            p_ids = tok(prompt, add_special_tokens=False).input_ids
            enc = tok(rec["answer"], add_special_tokens=False, return_offsets_mapping=True)
            a_ids = enc.input_ids[: args.max_answer_tokens]
            offsets = [tuple(o) for o in enc.offset_mapping[: args.max_answer_tokens]]
            labels, sentence, complete = label_tokens(rec, offsets)
            ids = torch.tensor([p_ids + a_ids])
            with torch.inference_mode():
                o = model(ids, output_hidden_states=True)
            start = len(p_ids)
            logp = torch.log_softmax(o.logits[0, start - 1 : -1].float(), dim=-1)
            nll = -logp.gather(-1, ids[0, start:, None]).squeeze(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            hidden = torch.stack([o.hidden_states[d][0, start:] for d in depths], dim=1)  # [T, 3, d]
            tensors[f"{i}.nll"], tensors[f"{i}.entropy"] = nll.float(), entropy.float()
            tensors[f"{i}.hidden"] = hidden.to(torch.float16)
            if ext is not None:
                resp = torch.zeros_like(ids)
                resp[:, start:] = 1
                f = ext.extract(ids, response_mask=resp)
                tensors[f"{i}.flow"], tensors[f"{i}.flow_valid"] = f.values[0], f.valid[0]
                tensors[f"{i}.states"] = f.states[0]
            rows.append({"id": rec["id"], "label": int(rec["has_factuality_error"]), "tokens": labels,
                         "sentence": sentence, "complete": complete, "source": rec["answer_source"]})  # fmt: skip
        meta = {"rows": json.dumps(rows)}
        if ext is not None:
            meta["feature_names"] = json.dumps(list(f.names))
        tmp = path.with_suffix(".tmp")
        save_file(tensors, tmp, metadata=meta)
        tmp.replace(path)
        done = min(first + args.shard_size, len(records))
        print(f"{done}/{len(records)} answers, {time.perf_counter() - t_start:.0f} s", flush=True)
    return 0


def load_store(root: Path) -> tuple[dict, list[dict], dict[str, dict[str, torch.Tensor]]]:
    """``(meta, rows, tensors by answer id)`` of every shard."""
    meta = json.loads((root / "meta.json").read_text())
    rows, tensors = [], {}
    for path in sorted(root.glob("shard-*.safetensors")):
        with safe_open(path, "pt") as fh:
            shard_rows = json.loads(fh.metadata()["rows"])
            meta.setdefault("feature_names", json.loads(fh.metadata().get("feature_names", "null")))
        data = load_file(path)
        for i, row in enumerate(shard_rows):
            tensors[row["id"]] = {k.split(".", 1)[1]: v for k, v in data.items() if k.split(".", 1)[0] == str(i)}
            rows.append(row)
    return meta, rows, tensors


def _features(rows: list[dict], tensors: dict, names: tuple[str, ...], states: bool) -> FlowFeatures:
    parts = []
    for r in rows:
        t = tensors[r["id"]]
        n_tok = t["flow"].shape[1]
        parts.append(FlowFeatures(
            t["flow"][None].float(), t["flow_valid"][None].bool(), torch.arange(n_tok)[None], names,
            states=t["states"][None].float() if states else None,
        ))  # fmt: skip
    return pad_features(parts)


def _padded_tokens(rows: list[dict], width: int) -> torch.Tensor:
    """``[N, width]`` token labels (nan where there is no token or the answer is not complete)."""
    out = torch.full((len(rows), width), float("nan"))
    for i, r in enumerate(rows):
        if r["complete"]:
            out[i, : len(r["tokens"])] = torch.tensor(r["tokens"], dtype=torch.float32)
    return out


def _flow_token_head(train, val, test, tensors, names, weight: float, seed: int) -> list[np.ndarray]:
    """Train the streaming design with the token loss on ``train`` (val selects); token risks of ``test``."""
    cfg = ValidatorConfig(num_features=len(names), feature_names=list(names), num_blocks=tensors[train[0]["id"]]
                          ["flow"].shape[0], head="attention", pooling="max", input_transform="block_log_standardize",
                          state_dim=0, state_blocks=[])  # fmt: skip
    tr, va = _features(train, tensors, names, False), _features(val, tensors, names, False)
    y_tr = torch.tensor([r["label"] for r in train], dtype=torch.float32)
    y_va = torch.tensor([r["label"] for r in val], dtype=torch.float32)
    v, _ = train_validator(tr, y_tr, va, y_va, config=cfg, token_labels=_padded_tokens(train, tr.values.shape[2]),
                           token_loss_weight=weight, seed=seed, epochs=20, patience=5, progress=False)  # fmt: skip
    return _token_scores(v, test, tensors, names, False)


def _token_scores(v: FlowValidator, rows, tensors, names, states: bool, culprits: dict | None = None):
    """Each answer's token logits ``[T]``; with ``culprits``, also its culprit column by answer id."""
    out = []
    for r in rows:
        o = v.score_features(_features([r], tensors, names, states))
        logits = o.token_logits[0].float().detach().cpu().numpy()[: len(r["tokens"])]
        # trailing blank tokens have no flow columns (FlowConfig.score_terminators=False): lowest risk
        out.append(np.pad(logits, (0, len(r["tokens"]) - len(logits)), constant_values=logits.min()))
        if culprits is not None:
            culprits[r["id"]] = int(o.culprit_column[0])
    return out


def _probe(train, val, test, tensors) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """Per-token logistic probe on one depth's residual; depth and L2 chosen by validation token AUROC."""

    def stack(rows, d):
        x = torch.cat([tensors[r["id"]]["hidden"][:, d].float() for r in rows if r["complete"]])
        y = torch.cat([torch.tensor(r["tokens"]) for r in rows if r["complete"]])
        return x, y

    best = None
    for d in range(tensors[train[0]["id"]]["hidden"].shape[1]):
        x_tr, y_tr = stack(train, d)
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        x_va, y_va = stack(val, d)
        for l2 in (1e-3, 1e-2, 1e-1, 1.0):
            w, b = train_logistic_regression((x_tr - mu) / sd, y_tr, l2=l2)
            a = auroc(y_va.numpy(), (((x_va - mu) / sd).double() @ w + b).numpy())
            if best is None or a > best[0]:
                best = (a, d, l2, w, b, mu, sd)
    _, d, l2, w, b, mu, sd = best

    def score(rows):
        return [(((tensors[r["id"]]["hidden"][:, d].float() - mu) / sd).double() @ w + b).numpy() for r in rows]

    return score(val), score(test), {"depth_index": d, "l2": l2, "val_auroc": best[0]}


def _stack(val_scores: dict, val_rows, test_scores: dict) -> list[np.ndarray]:
    """Logistic regression on the standardised token scores, fitted on the validation fold's tokens."""
    names = sorted(val_scores)
    keep = [i for i, r in enumerate(val_rows) if r["complete"]]
    x = torch.tensor(np.stack([np.concatenate([val_scores[n][i] for i in keep]) for n in names], 1))
    y = torch.tensor(np.concatenate([val_rows[i]["tokens"] for i in keep]), dtype=torch.float64)
    mu, sd = x.mean(0), x.std(0) + 1e-9
    w, b = train_logistic_regression((x - mu) / sd, y, l2=1e-2)
    n_test = len(test_scores[names[0]])
    return [((torch.tensor(np.stack([test_scores[n][i] for n in names], 1)) - mu) / sd @ w + b).numpy()
            for i in range(n_test)]  # fmt: skip


def _recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr: float = 0.1) -> float:
    thr = np.quantile(s[y == 0], 1.0 - fpr)
    return float((s[y == 1] > thr).mean())


def _metrics(rows: list[dict], scores: list[np.ndarray]) -> dict:
    """The token, sentence, answer and localization metrics of one detector's held-out token scores."""
    tok_y = np.concatenate([r["tokens"] for r in rows])
    tok_s = np.concatenate(scores)
    sent_y, sent_s = [], []
    for r, s in zip(rows, scores, strict=True):
        sent = np.asarray(r["sentence"])
        for k in np.unique(sent):
            sent_y.append(int(np.asarray(r["tokens"])[sent == k].max()))
            sent_s.append(float(s[sent == k].max()))
    loc, hit, share = [], [], []
    for r, s in zip(rows, scores, strict=True):
        y = np.asarray(r["tokens"])
        if y.max() == 1:
            hit.append(float(y[int(np.argmax(s))]))
            share.append(float(y.mean()))
            if y.min() == 0:
                loc.append(auroc(y, s))
    return {
        "token_auroc": auroc(tok_y, tok_s),
        "recall_at_10pct_fpr": _recall_at_fpr(tok_y, tok_s),
        "sentence_max_auroc": auroc(np.asarray(sent_y), np.asarray(sent_s)),
        "answer_max_auroc": auroc(np.asarray([r["label"] for r in rows]), np.asarray([s.max() for s in scores])),
        "per_answer_localization_auroc": float(np.mean(loc)),
        "riskiest_token_in_span": float(np.mean(hit)),
        "random_token_in_span": float(np.mean(share)),
        "n_tokens": int(tok_y.size), "n_error_tokens": int(tok_y.sum()),
        "n_sentences": len(sent_y), "n_error_sentences": int(np.sum(sent_y)),
    }  # fmt: skip


def _bootstrap(rows, scores: dict[str, list[np.ndarray]], n: int, seed: int) -> dict:
    """Intervals over resampled answers: each detector's token and sentence-max AUROC, and its
    paired difference with ``-log p`` and with entropy."""
    rng = np.random.default_rng(seed)
    keys = ("token_auroc", "sentence_max_auroc")
    draws: dict[str, dict[str, list[float]]] = {k: {m: [] for m in keys} for k in scores}
    for _ in range(n):
        idx = rng.integers(0, len(rows), len(rows))
        sub = [rows[i] for i in idx]
        for name, s in scores.items():
            m = _fast_metrics(sub, [s[i] for i in idx])
            for k in keys:
                draws[name][k].append(m[k])
    out = {}
    for name in scores:
        out[name] = {}
        for k in keys:
            d = np.asarray(draws[name][k])
            out[name][k] = [float(np.nanquantile(d, 0.025)), float(np.nanquantile(d, 0.975))]
            for base in ("-log p", "entropy"):
                if base in scores and base != name:
                    diff = d - np.asarray(draws[base][k])
                    out[name][f"{k} - ({base})"] = [float(np.nanquantile(diff, 0.025)),
                                                     float(np.nanquantile(diff, 0.975))]  # fmt: skip
    return out


def _fast_metrics(rows, scores) -> dict:
    tok_y = np.concatenate([r["tokens"] for r in rows])
    sent_y = np.concatenate([r["_sent_y"] for r in rows])
    sent_s = np.concatenate([np.maximum.reduceat(s[r["_order"]], r["_starts"]) for r, s in zip(rows, scores)])
    return {"token_auroc": auroc(tok_y, np.concatenate(scores)), "sentence_max_auroc": auroc(sent_y, sent_s)}


def evaluate(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    meta, rows, tensors = load_store(Path(args.store))
    questions = sorted({r["id"].rsplit("-", 1)[0] for r in rows})
    perm = np.random.default_rng(args.seed).permutation(len(questions))
    fold_of = {questions[j]: i % 5 for i, j in enumerate(perm)}
    names = tuple(meta["feature_names"]) if meta.get("flow") else ()
    shipped = None
    if meta.get("flow"):
        model_name = meta["model"].lower()
        shipped_name = next(k for k in bundled_validators() if k.startswith(model_name) and k.endswith("-corpus"))
        shipped = FlowValidator.from_pretrained(bundled_validators()[shipped_name])
    held: dict[str, dict[str, np.ndarray]] = {}
    choices, culprits = [], {}
    for k in [*args.folds, *(k for k in range(5) if k not in args.folds)]:
        test = [r for r in rows if fold_of[r["id"].rsplit("-", 1)[0]] == k]
        val = [r for r in rows if fold_of[r["id"].rsplit("-", 1)[0]] == (k + 1) % 5]
        train = [r for r in rows if fold_of[r["id"].rsplit("-", 1)[0]] not in (k, (k + 1) % 5)]
        t0 = time.perf_counter()
        cache = Path(args.store) / f"evaluate-fold{k}-seed{args.seed}-w{args.token_loss_weight}.json"
        if cache.is_file():  # a fold's held-out scores, kept so that a failed later step costs only itself
            saved = json.loads(cache.read_text())
            choices.append(saved["choice"])
            culprits.update(saved["culprits"])
            for name, by_id in saved["scores"].items():
                for uid, sc in by_id.items():
                    held.setdefault(name, {})[uid] = np.asarray(sc, dtype=np.float64)
            continue
        if k not in args.folds:
            if args.partial:
                continue
            print(f"fold {k} is neither computed here nor cached yet; run the report when it is.", flush=True)
            return 0
        s_test = {"-log p": [tensors[r["id"]]["nll"].numpy() for r in test],
                  "entropy": [tensors[r["id"]]["entropy"].numpy() for r in test]}  # fmt: skip
        s_val = {"-log p": [tensors[r["id"]]["nll"].numpy() for r in val],
                 "entropy": [tensors[r["id"]]["entropy"].numpy() for r in val]}  # fmt: skip
        s_val["probe"], s_test["probe"], choice = _probe(train, val, test, tensors)
        choices.append(choice)
        if names:
            s_test["shipped validator (not trained here)"] = _token_scores(
                shipped, test, tensors, names, True, culprits
            )
            head = _flow_token_head(train, val, val + test, tensors, names, args.token_loss_weight, args.seed)
            s_val["flow token head"], s_test["flow token head"] = head[: len(val)], head[len(val) :]
        s_test["combination"] = _stack(s_val, val, {n: s_test[n] for n in s_val})
        for name, sc in s_test.items():
            for r, s in zip(test, sc, strict=True):
                held.setdefault(name, {})[r["id"]] = np.asarray(s, dtype=np.float64)
        saved = {name: {r["id"]: held[name][r["id"]].tolist() for r in test} for name in s_test}
        fold_culprits = {r["id"]: culprits[r["id"]] for r in test if r["id"] in culprits}
        cache.write_text(json.dumps({"choice": choice, "culprits": fold_culprits, "scores": saved}))
        print(f"fold {k}: {len(test)} test answers, {time.perf_counter() - t0:.0f} s", flush=True)
    kept = [r for r in rows if r["complete"] and r["id"] in held["-log p"]]
    for r in kept:
        sent = np.asarray(r["sentence"])
        r["_order"] = np.argsort(sent, kind="stable")
        _, starts = np.unique(sent[r["_order"]], return_index=True)
        r["_starts"] = starts
        r["_sent_y"] = np.maximum.reduceat(np.asarray(r["tokens"])[r["_order"]], starts)
    scores = {name: [held[name][r["id"]] for r in kept] for name in held}
    bad = [r for r in kept if max(r["tokens"]) == 1]
    culprit_hit = [float(r["tokens"][culprits[r["id"]]]) for r in bad if culprits.get(r["id"], -1) >= 0]
    lowest = [r["tokens"][int(np.argmax(held["-log p"][r["id"]]))] for r in bad]
    report = {
        "store": args.store,
        "model": meta["model"],
        "answers": sum(r["id"] in held["-log p"] for r in rows),
        "complete_answers": len(kept),
        "folds": sorted({fold_of[r["id"].rsplit("-", 1)[0]] for r in kept}),
        "with_error": sum(r["label"] for r in kept),
        "depths": meta["depths"],
        "probe_choices": choices,
        "token_loss_weight": args.token_loss_weight,
        "detectors": {name: _metrics(kept, sc) for name, sc in scores.items()},
        "intervals": _bootstrap(kept, scores, args.bootstrap, args.seed),
        "shipped_culprit_in_span": float(np.mean(culprit_hit)) if culprit_hit else None,
        "lowest_probability_token_in_span": float(np.mean(lowest)),
        "command": "python benchmarks/human_spans.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    cols = ("token_auroc", "recall_at_10pct_fpr", "sentence_max_auroc", "per_answer_localization_auroc",
            "riskiest_token_in_span", "random_token_in_span", "answer_max_auroc")  # fmt: skip
    print(f"{meta['model']}: {len(kept)} answers ({report['with_error']} with an error span)")
    print("detector".ljust(38) + "".join(c[:14].rjust(16) for c in cols))
    for name, m in report["detectors"].items():
        print(name.ljust(38) + "".join(f"{m[c]:16.3f}" for c in cols))
    print(f"in answers with an error: the shipped culprit lies in a span {report['shipped_culprit_in_span']}, "
          f"the lowest-probability token {report['lowest_probability_token_in_span']:.3f}")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="Teacher-force the answers; write the token-level inputs (resumable).")
    ex.add_argument("--model", default="SmolLM2-135M-Instruct")
    ex.add_argument("--out", required=True)
    ex.add_argument("--data", default=str(DATA))
    ex.add_argument("--clean", type=int, default=236, help="Answers without an error span to add (seeded).")
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--max-answer-tokens", type=int, default=192)
    ex.add_argument("--flow", action="store_true", help="Also the flow features (the default validator's recipe).")
    ex.add_argument("--shard-size", type=int, default=16)
    ex.add_argument("--threads", type=int, default=1)
    ex.set_defaults(func=extract)
    ev = sub.add_parser("evaluate", help="Five grouped folds; the metrics of the module docstring.")
    ev.add_argument("--store", required=True)
    ev.add_argument("--out", required=True)
    ev.add_argument("--bootstrap", type=int, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--token-loss-weight", type=float, default=1.0)
    ev.add_argument(
        "--folds",
        type=int,
        nargs="+",
        default=[0, 1, 2, 3, 4],
        help="Folds to compute here, in this order (each is cached in the store; a second process can "
        "take the others; the report is written once all five are there).",
    )
    ev.add_argument("--partial", action="store_true",
                    help="Report on the cached folds only (fewer answers; the report lists its folds).")  # fmt: skip
    ev.set_defaults(func=evaluate)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
