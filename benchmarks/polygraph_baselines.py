"""lm-polygraph's single-pass uncertainty estimators on the corpus answers (the peer's own formulas).

Run with lm-polygraph installed (``pip install -e ".[compare]"``). For every labelled corpus answer
(its primary view, as ``benchmarks/corpus_transfer.py replay`` extracts it) one teacher-forced
forward of the same model, with eager attention, gives the statistics lm-polygraph's stat
calculators would give for that greedy answer (``greedy_log_likelihoods``, ``greedy_log_probs``,
``entropy``, ``attention_all`` in its layout: row ``j`` holds answer token ``j - 1``'s attention to
answer tokens ``0..j-1``); the estimators themselves are lm-polygraph's classes, called on those
statistics. Scores go to ``polygraph.json`` in each cell folder, read by ``corpus_transfer.py matrix``.

    python benchmarks/polygraph_baselines.py --model SmolLM2-135M-Instruct \
        --corpus answers/SmolLM2-135M-Instruct/corpus --features runs/corpus-feats/smol
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from hf_flowcheck.detectors.base import encode_text
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.corpus import answer_view, read_corpus


def estimators(model) -> dict:
    from lm_polygraph import estimators as E

    cfg = model.config
    return {
        "MSP": E.MaximumSequenceProbability(),
        "Perplexity": E.Perplexity(),
        "MeanTokenEntropy": E.MeanTokenEntropy(),
        "SelfCertainty": E.SelfCertainty(),
        "FisherRao": E.FisherRao(),
        "RenyiNeg": E.RenyiNeg(),
        "BoostedProbSequence": E.BoostedProbSequence(),
        "RAUQ": E.RAUQ(n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads),
    }


@torch.inference_mode()
def stats_of(model, prompt_ids: list[int], answer_ids: list[int]) -> dict:
    ids = torch.tensor([prompt_ids + answer_ids])
    out = model(input_ids=ids, output_attentions=True)
    p, c = len(prompt_ids), len(answer_ids)
    logp = torch.log_softmax(out.logits[0, p - 1 : p - 1 + c].float(), -1)  # [c, V]
    tok = torch.tensor(answer_ids)
    ll = logp.gather(-1, tok[:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    att = torch.stack([a[0] for a in out.attentions])  # [L, H, S, S]
    n_lh = att.shape[0] * att.shape[1]
    attn = np.zeros((n_lh, c, c))
    for j in range(1, c):
        attn[:, j, :j] = att[:, :, p + j - 1, p : p + j].reshape(n_lh, j).double().numpy()
    return {
        "greedy_log_likelihoods": [ll.numpy()],
        "greedy_log_probs": [logp.numpy()],
        "entropy": [ent.numpy()],
        "attention_all": [attn],
        "greedy_tokens": [answer_ids],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--corpus", required=True)
    p.add_argument("--features", required=True, help="The cell folders of corpus_transfer.py replay.")
    args = p.parse_args(argv)
    model, tok = load_model(args.model, attn_implementation="eager")
    model.eval()
    ests = estimators(model)
    for f in read_corpus(args.corpus):
        task, style = f.header["dataset"]["name"], f.header["dataset"]["style"]
        cell = Path(args.features) / task / style
        if not cell.is_dir():
            continue
        path = cell / "polygraph.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        for r in f.labelled:
            v = answer_view(r, "primary", tok)
            if v is None or v.uid in done or not v.gen_ids:
                continue
            stats = stats_of(model, encode_text(tok, v.prompt), list(v.gen_ids))
            done[v.uid] = {name: float(np.asarray(e(stats)).reshape(-1)[0]) for name, e in ests.items()}
        path.write_text(json.dumps(done))
        print(f"{task}/{style}: {len(done)} answers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
