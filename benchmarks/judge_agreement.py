"""How often the corpus judge agrees with a second rule, and the corpus's counts per task and style.

The corpus rule (:func:`hf_flowcheck.data.corpus.judge_answer`): an alias inside the answer, or token
F1 >= 0.5, is correct. The second rule is the project's earlier one (:class:`ReferenceF1Judge`): token
F1 >= 0.5 correct, F1 == 0 hallucinated, anything between dropped. Both see the same answers.

    python benchmarks/judge_agreement.py --corpus answers/SmolLM2-135M-Instruct/corpus --sample 400
"""

from __future__ import annotations

import argparse
import collections
import random
import sys

from hf_flowcheck.data import ReferenceF1Judge
from hf_flowcheck.workflows.corpus import read_corpus


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--sample", type=int, default=400, help="Answers compared (seeded sample of the labelled ones).")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    files = read_corpus(args.corpus)
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    labelled = []
    for f in files:
        key = (f.header["dataset"]["name"], f.header["dataset"]["style"])
        for r in f.records:
            counts[key][{0: "correct", 1: "hallucinated", None: "unlabelled"}[r.label]] += 1
            if r.label is not None and r.references:
                labelled.append(r)
    print("task / style: correct, hallucinated, unlabelled")
    total = collections.Counter()
    for key in sorted(counts):
        c = counts[key]
        total.update(c)
        print(f"{key[0]:>17} / {key[1]:<14} {c['correct']:5d} {c['hallucinated']:5d} {c['unlabelled']:5d}")
    print(f"{'all':>17}   {'':<14} {total['correct']:5d} {total['hallucinated']:5d} {total['unlabelled']:5d}")
    random.Random(args.seed).shuffle(labelled)
    sample = labelled[: args.sample]
    second = ReferenceF1Judge()
    pairs = collections.Counter()
    for r in sample:
        other = second(r.answer, r.answer, r.references).label
        pairs[(r.label, other)] += 1
    both = sum(v for (a, b), v in pairs.items() if b is not None)
    agree = sum(v for (a, b), v in pairs.items() if b is not None and a == b)
    print(
        f"\nsecond rule on {len(sample)} labelled answers: {both} labelled by both, agreement {agree / max(both, 1):.3f}"
    )
    for (a, b), v in sorted(pairs.items(), key=lambda kv: str(kv[0])):
        print(f"  corpus {a} / F1 rule {b}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
