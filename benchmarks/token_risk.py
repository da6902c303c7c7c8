"""Per-token risks on the test answers: spread, answer-level AUROC, and a localization proxy.

A token's risk is ``sigmoid`` of the validator's token logit (``FlowValidatorOutput.token_logits``:
the pooling applied to that token's events alone, state term included). Before session 7 it was
``sigmoid`` of the token's highest event logit; both are reported.

On the seed-0 test split of a replayed store, for each validator:

- **spread**: the share of token risks at or above 0.98, and the mean within-answer standard
  deviation of the risks;
- **answer AUROC** (95% interval) of the answer score, of the highest token risk and of the first
  token's risk;
- **localization proxy**: the weak token labels of
  :func:`~hf_flowcheck.workflows.token_labels.reference_token_labels` (in a hallucinated answer, a
  word token absent from every reference answer is unsupported, one present is supported). The
  AUROC of the token risk for unsupported against supported tokens of the hallucinated answers that
  have both kinds, pooled over tokens and averaged per answer (0.5 = no localization).

``--train W [W ...]`` also trains the streaming design (flow + lens channels, attention head, no
state branch, ``prefix_augment=0.5``) on the seed-0 training split with token loss weight ``W``
(the same weak labels on the training answers; ``0`` = answer loss only) and reports it likewise.

Run: ``python benchmarks/token_risk.py --parts runs/replay/smol-qa
--answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl --model SmolLM2-135M-Instruct
--validator hf_flowcheck/bundled/validators/smollm2-135m-instruct-halueval-qa-streaming --train 0 1
--out runs/token-risk.json``
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from transformers import AutoTokenizer
from validator_selection import ATTN, FLOW, LENS, rows

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import FlowValidator, ValidatorConfig
from hf_flowcheck.metrics import auroc, evaluate_scores
from hf_flowcheck.offline_models import resolve_model
from hf_flowcheck.workflows.answers import read_answers
from hf_flowcheck.workflows.replay import load_parts
from hf_flowcheck.workflows.token_labels import reference_token_labels
from hf_flowcheck.workflows.training import train_validator


def _ci(y: np.ndarray, s: np.ndarray) -> dict:
    m = evaluate_scores(y, s, name="x", n_bootstrap=1000, seed=0)["metrics"]["auroc"]
    return {"auroc": m["value"], "ci": [m["low"], m["high"]], "n": len(y)}


def evaluate(v: FlowValidator, test, y: np.ndarray, token_y: np.ndarray) -> dict:
    """The metrics of the module docstring for one validator on the test rows."""
    out = v.score_features(test.select(v.config.feature_names))
    scored = test.valid.any(1)  # [N, T] columns with events
    defs = {
        "token logit": torch.sigmoid(out.token_logits.float()),
        "highest event logit (before session 7)": torch.sigmoid(out.event_logits.float().max(1).values),
    }
    res: dict = {"answer score": _ci(y, out.scores.double().numpy())}
    for name, risk in defs.items():
        r = risk.masked_fill(~scored, float("nan")).double().numpy()
        vals = r[~np.isnan(r)]
        sd = [np.nanstd(row) for row in r if np.sum(~np.isnan(row)) > 1]
        first = np.array([row[~np.isnan(row)][0] for row in r])
        loc_y, loc_s, per_answer = [], [], []
        for i in np.flatnonzero(y == 1):
            cols = ~np.isnan(token_y[i]) & ~np.isnan(r[i])
            kinds = token_y[i][cols]
            if kinds.size and kinds.min() == 0 and kinds.max() == 1:
                loc_y.extend(kinds.tolist())
                loc_s.extend(r[i][cols].tolist())
                per_answer.append(auroc(kinds, r[i][cols]))
        res[name] = {
            "share_at_least_0.98": float(np.mean(vals >= 0.98)),
            "median": float(np.median(vals)),
            "mean_within_answer_sd": float(np.mean(sd)),
            "answer AUROC of the highest token risk": _ci(y, np.nanmax(r, axis=1)),
            "answer AUROC of the first token's risk": _ci(y, first),
            "localization AUROC (pooled tokens)": _ci(np.array(loc_y), np.array(loc_s)) if loc_y else None,
            "localization AUROC (mean per answer)": float(np.mean(per_answer)) if per_answer else None,
            "localization answers": len(per_answer),
        }
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--answers", required=True, help="the answers JSONL the store was replayed from")
    p.add_argument("--model", required=True, help="tokenizer of the store's model (offline name or folder)")
    p.add_argument("--validator", action="append", default=[], help="validator folder (repeatable)")
    p.add_argument("--train", type=float, nargs="*", default=[], help="token loss weights to train with")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    feats, labels, uids = load_parts(a.parts)
    split = split_records(uids, seed=a.seed)
    index = {u: i for i, u in enumerate(uids)}
    has = feats.valid.reshape(len(feats), -1).any(1)
    tr, va, te = (
        np.array([index[u] for u in split[n] if bool(has[index[u]])]) for n in ("train", "validation", "test")
    )
    y = labels.numpy()
    records = {r.uid: r for r in read_answers(a.answers).records}
    tok = AutoTokenizer.from_pretrained(resolve_model(a.model))
    token_y = reference_token_labels(feats, uids, records, tok, labels).numpy()
    test = rows(feats, te)
    report: dict = {"split_seed": a.seed, "sizes": [len(tr), len(va), len(te)], "validators": {}}
    for folder in a.validator:
        res = evaluate(FlowValidator.from_pretrained(folder), test, y[te], token_y[te])
        report["validators"][folder.rstrip("/").split("/")[-1]] = res
        print(json.dumps({folder: res}, default=float), file=sys.stderr)
    f = feats.select(FLOW + LENS)
    cfg = ValidatorConfig.from_feature_names(f.names, **{**ATTN, "num_blocks": f.num_blocks})
    for w in a.train:
        model, hist = train_validator(
            rows(f, tr), y[tr], rows(f, va), y[va], config=cfg, epochs=a.epochs, patience=10, batch_size=32,
            seed=0, progress=False, prefix_augment=0.5, token_labels=torch.as_tensor(token_y[tr]),
            token_loss_weight=w,
        )  # fmt: skip
        res = evaluate(model, rows(f, te), y[te], token_y[te])
        res["best_epoch"] = hist.best_epoch
        report["validators"][f"streaming design, token loss weight {w}"] = res
        print(json.dumps({w: res}, default=float), file=sys.stderr)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
