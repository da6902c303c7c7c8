"""Generate the model's greedy answers into a committed JSONL (resumable). See hf_flowcheck.workflows.answers."""

import argparse
import sys

import numpy as np

from hf_flowcheck import data
from hf_flowcheck.hub import model_fingerprint
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.stopping import AnswerLineStop
from hf_flowcheck.workflows.answers import generate_answers

p = argparse.ArgumentParser()
p.add_argument("--model", default="SmolLM2-135M-Instruct")
p.add_argument("--dataset", default="halueval-qa")
p.add_argument("--out", required=True)
p.add_argument("--limit", type=int, default=None)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--batch-size", type=int, default=16)
p.add_argument("--max-new-tokens", type=int, default=32)
a = p.parse_args()
model, tok = load_model(a.model)
if a.dataset == "selfaware":
    recs = data.load_selfaware(None)
    judge = "record-label"
else:
    recs = data.load_halueval(a.dataset.split("-", 1)[1], None)
    judge = data.ReferenceF1Judge()
order = np.random.default_rng(a.seed).permutation(len(recs)).tolist()
recs = [recs[i] for i in order][: a.limit]
from transformers import StoppingCriteriaList

generate_answers(
    model,
    tok,
    recs,
    a.out,
    prompt_fn=lambda ex: data.generation_prompt(ex),
    judge=judge,
    dataset={"name": a.dataset, "order": "permutation", "seed": a.seed, "prompt_style": "plain"},
    fingerprint=model_fingerprint(model),
    batch_size=a.batch_size,
    max_new_tokens=a.max_new_tokens,
    generate_kwargs={"stopping_criteria": StoppingCriteriaList([AnswerLineStop(tok)])},
    decoding={"stop": "answer-line", "batch_size": a.batch_size, "padding": "left"},
    log=lambda s: print(s, file=sys.stderr, flush=True),
)
