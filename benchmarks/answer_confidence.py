"""Token-confidence statistics of every answer in an answers file, teacher-forced (resumable JSON cache).

The model's own generated tokens (``gen_ids``, what the flow features cover) are scored after their
prompt: ``-mean log p``, ``-min log p``, mean entropy and perplexity per answer
(``hf_flowcheck.detectors.baselines.token_confidence_features``).

    python benchmarks/answer_confidence.py --answers answers/SmolLM2-135M-Instruct/halueval-qa.jsonl \
        --out runs/confidence-smol-qa.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from hf_flowcheck.detectors.base import ScoredExample
from hf_flowcheck.detectors.baselines import CONFIDENCE_STATISTICS, token_confidence_features
from hf_flowcheck.offline_models import load_model
from hf_flowcheck.workflows.answers import read_answers


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--answers", required=True)
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first LIMIT answers only")
    p.add_argument(
        "--test-of-seeds",
        type=int,
        nargs="*",
        default=None,
        help="only the answers in the test split of these split seeds (the rows a table reports)",
    )
    p.add_argument("--uids", default=None, help="only the answers whose uid is in this JSON list")
    a = p.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cache = {"statistics": list(CONFIDENCE_STATISTICS)}
    if os.path.exists(a.out):
        with open(a.out) as fh:
            cache = json.load(fh)
    done = cache.setdefault("scores", {})
    model, tok = load_model(a.model)
    recs = [r for r in read_answers(a.answers).records[: a.limit] if r.label is not None and r.uid not in done]
    if a.test_of_seeds:
        from hf_flowcheck.data.splits import split_records

        labelled = [r.uid for r in read_answers(a.answers).records if r.label is not None]
        keep = set().union(*(split_records(labelled, seed=s).test for s in a.test_of_seeds))
        recs = [r for r in recs if r.uid in keep]
    if a.uids:
        with open(a.uids) as fh:
            wanted = set(json.load(fh))
        recs = [r for r in recs if r.uid in wanted]
    t0 = time.perf_counter()
    for i in range(0, len(recs), 64):
        chunk = recs[i : i + 64]
        ex = [ScoredExample(tok(r.prompt)["input_ids"], r.gen_ids, r.label, r.uid) for r in chunk]
        stats = token_confidence_features(model, ex, batch_size=a.batch_size)
        for r, s in zip(chunk, stats.tolist()):
            done[r.uid] = s
        tmp = a.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(cache, fh)
        os.replace(tmp, a.out)
        print(f"{len(done)} answers scored ({(i + len(chunk)) / (time.perf_counter() - t0):.2f}/s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
