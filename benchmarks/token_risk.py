"""Per-token risks on the test answers: spread, answer-level AUROC, and a localization proxy.

A token's risk is ``sigmoid`` of the validator's token logit (``FlowValidatorOutput.token_logits``:
the pooling applied to that token's events alone, state term included). Before session 7 it was
``sigmoid`` of the token's highest event logit; both are reported.

On the seed-0 test split of a replayed store, for each validator:

- **spread**: the share of token risks at or above 0.98, and the mean within-answer standard
  deviation of the risks;
- **answer AUROC** (95% interval) of the answer score, of the highest token risk and of the first
  token's risk;
- **localization proxy**: HaluEval-QA has no token labels. Within each hallucinated answer, a token
  whose text (lower-cased word characters) does not occur in any reference answer is "unsupported",
  one whose text does is "supported"; the AUROC of the token risk for unsupported against supported
  tokens, over the hallucinated answers that have both kinds (0.5 = no localization).

Run: ``python benchmarks/token_risk.py --parts runs/replay/smol-qa
--answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl --model SmolLM2-135M-Instruct
--validator hf_flowcheck/bundled/validators/smollm2-135m-instruct-halueval-qa-streaming --out runs/token-risk.json``
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import numpy as np
import torch
from transformers import AutoTokenizer

from hf_flowcheck.data.splits import split_records
from hf_flowcheck.detectors import FlowValidator
from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.metrics import auroc, evaluate_scores
from hf_flowcheck.offline_models import resolve_model
from hf_flowcheck.workflows.answers import read_answers
from hf_flowcheck.workflows.replay import load_parts


def _words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def _ci(y: np.ndarray, s: np.ndarray) -> dict:
    m = evaluate_scores(y, s, name="x", n_bootstrap=1000, seed=0)["metrics"]["auroc"]
    return {"auroc": m["value"], "ci": [m["low"], m["high"]], "n": len(y)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", required=True)
    p.add_argument("--answers", required=True, help="the answers JSONL the store was replayed from")
    p.add_argument("--model", required=True, help="tokenizer of the store's model (offline name or folder)")
    p.add_argument("--validator", action="append", required=True, help="validator folder (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    torch.set_num_threads(1)
    feats, labels, uids = load_parts(a.parts)
    split = split_records(uids, seed=a.seed)
    index = {u: i for i, u in enumerate(uids)}
    has = feats.valid.reshape(len(feats), -1).any(1)
    te = [index[u] for u in split.test if bool(has[index[u]])]
    y = labels.numpy()[te]
    records = {r.uid: r for r in read_answers(a.answers).records}
    tok = AutoTokenizer.from_pretrained(resolve_model(a.model))
    # Per test answer and column: 1 unsupported, 0 supported, -1 not a word token / not an answer token.
    support = np.full((len(te), feats.valid.shape[-1]), -1, dtype=np.int64)
    for row, i in enumerate(te):
        rec = records[uids[i]]
        start = len(encode_text(tok, rec.prompt))
        refs = " " + " ".join(_words(r) for r in rec.references) + " "
        for col, pos in enumerate(feats.positions[i].tolist()):
            j = pos - start
            if pos < 0 or not 0 <= j < len(rec.gen_ids):
                continue
            w = _words(tok.decode([rec.gen_ids[j]]))
            if w:
                support[row, col] = int(f" {w} " not in refs and f" {w}" not in refs and w not in refs.split())
    report: dict = {"split_seed": a.seed, "n_test": len(te), "validators": {}}
    for folder in a.validator:
        v = FlowValidator.from_pretrained(folder)
        sub = feats.select(v.config.feature_names)
        sub = type(sub)(
            sub.values[te], sub.valid[te], sub.positions[te], sub.names, [sub.sample_keys[i] for i in te],
            states=None if sub.states is None else sub.states[te],
        )  # fmt: skip
        out = v.score_features(sub)
        scored = sub.valid.any(1)  # [N, T] columns with events
        defs = {
            "token logit (session 7)": torch.sigmoid(out.token_logits.float()),
            "highest event logit (before)": torch.sigmoid(out.event_logits.float().max(1).values),
        }
        res: dict = {"answer score": _ci(y, out.scores.double().numpy())}
        for name, risk in defs.items():
            r = risk.masked_fill(~scored, float("nan")).double().numpy()
            vals = r[~np.isnan(r)]
            sd = [np.nanstd(row) for row in r if np.sum(~np.isnan(row)) > 1]
            first = np.array([row[~np.isnan(row)][0] for row in r])
            top = np.nanmax(r, axis=1)
            loc_y, loc_s, per_answer = [], [], []
            for row in range(len(te)):
                if y[row] != 1:
                    continue
                cols = (support[row] >= 0) & ~np.isnan(r[row])
                kinds = support[row][cols]
                if kinds.min(initial=1) == 0 and kinds.max(initial=0) == 1:
                    loc_y.extend(kinds.tolist())
                    loc_s.extend(r[row][cols].tolist())
                    per_answer.append(auroc(kinds, r[row][cols]))
            res[name] = {
                "share_at_least_0.98": float(np.mean(vals >= 0.98)),
                "median": float(np.median(vals)),
                "mean_within_answer_sd": float(np.mean(sd)),
                "answer AUROC of the highest token risk": _ci(y, top),
                "answer AUROC of the first token's risk": _ci(y, first),
                "localization AUROC (pooled tokens)": _ci(np.array(loc_y), np.array(loc_s)) if loc_y else None,
                "localization AUROC (mean per answer)": float(np.mean(per_answer)) if per_answer else None,
                "localization answers": len(per_answer),
            }
        report["validators"][folder.rstrip("/").split("/")[-1]] = res
        print(json.dumps({folder: res}, indent=1, default=float), file=sys.stderr)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(report, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
