"""Weak token labels from reference answers, for token-level training and evaluation.

HaluEval-QA has no token labels. :func:`reference_token_labels` derives them from the reference
answers the judge compared against: in a hallucinated answer, a word token whose text (lower-cased
word characters) occurs in no reference answer, not even inside a word (so a sub-word piece of a
reference word counts as supported), is *unsupported* (1), and one whose text does is *supported*
(0); every word token of a right answer is 0; tokens without word characters
(punctuation, the newline) and columns that are not answer tokens are ``nan`` (no label).

These labels are noisy: a wrong answer can repeat a reference word in a wrong place, and a right
answer can add words the reference lacks.

``rule="references+question"`` is for the longer answers of the corpus (a chat answer restates the
question before it answers: "Bert Myers was born in Manchester"): a word of the question also counts
as supported, and function words (:data:`FUNCTION_WORDS`) get no label, so what is left marked
unsupported is the answer's own claim. ``benchmarks/token_label_check.py`` measures both rules
against word labels made by hand. ``benchmarks/token_risk.py`` uses them as a localization
proxy; ``flowcheck train --token-labels`` as an auxiliary target of the token logits.

Human span labels (HaluQuestQA's expert-marked error spans, as character offsets into the answer)
become token labels with :func:`span_token_labels`, and :func:`sentence_of_tokens` groups the tokens
into sentences for span-level metrics (``benchmarks/human_spans.py``).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_flowcheck.extraction import FlowFeatures

__all__ = [
    "FUNCTION_WORDS",
    "TOKEN_LABEL_RULES",
    "question_of",
    "reference_token_labels",
    "sentence_of_tokens",
    "span_token_labels",
    "word_labels",
    "words",
]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")

TOKEN_LABEL_RULES: tuple[str, ...] = ("references", "references+question")
#: Words that carry no claim of their own (left unlabelled by ``rule="references+question"``).
FUNCTION_WORDS = frozenset(
    {
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "from",
        "by",
        "with",
        "and",
        "or",
        "but",
        "is",
        "was",
        "are",
        "were",
        "be",
        "been",
        "being",
        "has",
        "have",
        "had",
        "it",
        "its",
        "he",
        "she",
        "his",
        "her",
        "they",
        "their",
        "this",
        "that",
        "these",
        "those",
        "who",
        "which",
        "what",
        "as",
        "also",
        "not",
        "no",
    }
)


def words(text: str) -> str:
    """Lower-cased word characters of ``text``, space-separated."""
    return " ".join(re.findall(r"\w+", text.lower()))


def question_of(prompt: str) -> str:
    """The question a corpus or HaluEval prompt asks: the text after its last ``Question:`` up to the line end."""
    if "Question:" not in prompt:
        return ""
    return prompt.rsplit("Question:", 1)[1].split("\n", 1)[0]


def word_labels(answer_words: str, references: Sequence[str], question: str = "", rule: str = "references") -> list:
    """Label the words of one hallucinated answer: 1 unsupported, 0 supported, ``None`` unlabelled.

    Args:
        answer_words: Space-separated lower-cased words (:func:`words`) of one token or answer.
        references: The reference answers.
        question: The question (``rule="references+question"``).
        rule: One of :data:`TOKEN_LABEL_RULES`.
    """
    if rule not in TOKEN_LABEL_RULES:
        raise ValueError(f"rule={rule!r} is not supported; use one of {', '.join(map(repr, TOKEN_LABEL_RULES))}.")
    support = " ".join(words(r) for r in references)
    if rule == "references+question":
        support += " " + words(question)
    out: list = []
    for part in answer_words.split():
        if rule == "references+question" and part in FUNCTION_WORDS:
            out.append(None)
        else:
            out.append(0 if part in support else 1)
    return out


def reference_token_labels(
    features: FlowFeatures,
    uids: Sequence[str],
    records: Mapping[str, Any],
    tokenizer: Any,
    labels: Sequence[int] | torch.Tensor,
    rule: str = "references",
) -> torch.Tensor:
    """Label each feature column of each answer: 1 unsupported, 0 supported, ``nan`` unlabelled.

    Args:
        features: Replayed features; ``positions [N, T]`` are sequence indices (prompt, then answer).
        uids: ``[N]`` the uid of each row.
        records: ``{uid: AnswerRecord}`` (``prompt``, ``gen_ids``, ``references``), from
            :func:`~hf_flowcheck.workflows.answers.read_answers`.
        tokenizer: The model's tokenizer (finds where each prompt ends, decodes the tokens).
        labels: ``[N]`` answer labels (1 hallucinated).
        rule: One of :data:`TOKEN_LABEL_RULES` (see the module docstring).

    Returns:
        ``[N, T]`` float32.

    Raises:
        ValueError: A uid without a record, or a record without references.
    """
    from hf_flowcheck.detectors.base import encode_text

    if len(uids) != len(features):
        raise ValueError(f"{len(uids)} uids for {len(features)} feature rows; give one uid per row.")
    y = torch.as_tensor(labels).reshape(-1).tolist()
    out = torch.full(tuple(features.positions.shape), float("nan"))
    for row, uid in enumerate(uids):
        rec = records.get(uid)
        if rec is None:
            raise ValueError(
                f"uid {uid!r} has no answer record; pass the answers file the features were replayed from."
            )
        if not rec.references:
            raise ValueError(f"the record of {uid!r} has no reference answers, so its tokens cannot be labelled.")
        start = len(encode_text(tokenizer, rec.prompt))
        question = question_of(rec.prompt)
        for col, pos in enumerate(features.positions[row].tolist()):
            j = pos - start
            if pos < 0 or not 0 <= j < len(rec.gen_ids):
                continue
            w = words(tokenizer.decode([rec.gen_ids[j]]))
            if not w:
                continue
            if not y[row]:
                out[row, col] = 0.0
                continue
            marks = [m for m in word_labels(w, rec.references, question, rule) if m is not None]
            if marks:
                out[row, col] = float(any(marks))
    return out


def span_token_labels(
    offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int] | None]
) -> tuple[list[int], bool]:
    """Token labels from character spans: 1 for a token that overlaps a span, else 0.

    Args:
        offsets: ``[T]`` ``(start, end)`` character offsets of the kept answer tokens (a fast
            tokenizer's ``offset_mapping``; the answer may be cut after any token).
        spans: ``(start, end)`` character ranges of the marked errors; ``None`` for a span the source
            could not place.

    Returns:
        ``(labels, complete)``: ``complete`` is false when a span is unplaced or ends after the last
        kept token, so some marked error has no labelled token and the answer's zeros cannot be
        trusted.

    Example:
        >>> span_token_labels([(0, 3), (3, 8), (8, 12)], [(4, 6)])
        ([0, 1, 0], True)
    """
    kept_end = offsets[-1][1] if offsets else 0
    placed = [s for s in spans if s is not None]
    complete = len(placed) == len(spans) and all(e <= kept_end for _, e in placed)
    return [int(any(a < e and s < b for s, e in placed)) for a, b in offsets], complete


def sentence_of_tokens(text: str, offsets: Sequence[tuple[int, int]]) -> list[int]:
    """The index of the sentence (split after ``.``, ``!``, ``?`` and at line breaks) holding each token.

    Example:
        >>> sentence_of_tokens("It is. So it goes", [(0, 2), (3, 6), (7, 9), (10, 12)])
        [0, 0, 1, 1]
    """
    breaks = [m.end() for m in _SENTENCE_END.finditer(text)]  # ascending: where each later sentence starts
    return [bisect.bisect_right(breaks, a) for a, _ in offsets]
