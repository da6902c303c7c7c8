"""Weak token labels against labels made by hand, on 45 hallucinated corpus answers.

``benchmarks/data/token_label_handcheck_smol.json`` holds, for each answer, the words that state
something wrong, marked by hand. Each rule of
:func:`~hf_flowcheck.workflows.token_labels.word_labels` labels the same words; reported at word
level over the answers with a hand-marked error: precision and recall of the words a rule marks
unsupported, the share of answers where a rule marks at least one hand-marked word, and on the
answers with nothing marked by hand (they repeat the question, or the judge missed an alias), the
share of their labelled words a rule calls unsupported.

Run: ``python benchmarks/token_label_check.py --out benchmarks/results/token_label_check_smol.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hf_flowcheck.workflows.token_labels import TOKEN_LABEL_RULES, word_labels, words

DATA = Path(__file__).parent / "data" / "token_label_handcheck_smol.json"


def check(rows: list[dict], rule: str) -> dict:
    tp = fp = fn = 0
    hit = with_error = 0
    clean_marked = clean_labelled = 0
    for r in rows:
        ws = words(r["answer"]).split()
        marks = word_labels(" ".join(ws), r["refs"], r["q"], rule)
        wrong = set(r["hand_wrong_words"].split())
        if not wrong:
            labelled = [m for m in marks if m is not None]
            clean_marked += sum(labelled)
            clean_labelled += len(labelled)
            continue
        with_error += 1
        marked = {w for w, m in zip(ws, marks, strict=True) if m == 1}
        tp += len(marked & wrong)
        fp += len(marked - wrong)
        fn += len(wrong - marked)
        hit += bool(marked & wrong)
    return {
        "answers_with_a_hand_marked_error": with_error,
        "word_precision": round(tp / max(tp + fp, 1), 3),
        "word_recall": round(tp / max(tp + fn, 1), 3),
        "answers_where_a_marked_word_is_wrong": round(hit / max(with_error, 1), 3),
        "answers_without_an_error": len(rows) - with_error,
        "their_words_marked_unsupported": round(clean_marked / max(clean_labelled, 1), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = json.loads(Path(args.data).read_text())["answers"]
    result = {rule: check(rows, rule) for rule in TOKEN_LABEL_RULES}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/token_label_check.py " + " ".join(
            sys.argv[1:] if argv is None else argv), **result}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
