"""Weak token labels from reference answers, for token-level training and evaluation.

HaluEval-QA has no token labels. :func:`reference_token_labels` derives them from the reference
answers the judge compared against: in a hallucinated answer, a word token whose text (lower-cased
word characters) occurs in no reference answer, not even inside a word (so a sub-word piece of a
reference word counts as supported), is *unsupported* (1), and one whose text does is *supported*
(0); every word token of a right answer is 0; tokens without word characters
(punctuation, the newline) and columns that are not answer tokens are ``nan`` (no label).

These labels are noisy: a wrong answer can repeat a reference word in a wrong place, and a right
answer can add words the reference lacks. ``benchmarks/token_risk.py`` uses them as a localization
proxy; ``flowcheck train --token-labels`` as an auxiliary target of the token logits.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hf_flowcheck.extraction import FlowFeatures

__all__ = ["reference_token_labels", "words"]


def words(text: str) -> str:
    """Lower-cased word characters of ``text``, space-separated."""
    return " ".join(re.findall(r"\w+", text.lower()))


def reference_token_labels(
    features: FlowFeatures,
    uids: Sequence[str],
    records: Mapping[str, Any],
    tokenizer: Any,
    labels: Sequence[int] | torch.Tensor,
) -> torch.Tensor:
    """Label each feature column of each answer: 1 unsupported, 0 supported, ``nan`` unlabelled.

    Args:
        features: Replayed features; ``positions [N, T]`` are sequence indices (prompt, then answer).
        uids: ``[N]`` the uid of each row.
        records: ``{uid: AnswerRecord}`` (``prompt``, ``gen_ids``, ``references``), from
            :func:`~hf_flowcheck.workflows.answers.read_answers`.
        tokenizer: The model's tokenizer (finds where each prompt ends, decodes the tokens).
        labels: ``[N]`` answer labels (1 hallucinated).

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
        refs = " ".join(words(r) for r in rec.references)
        for col, pos in enumerate(features.positions[row].tolist()):
            j = pos - start
            if pos < 0 or not 0 <= j < len(rec.gen_ids):
                continue
            w = words(tokenizer.decode([rec.gen_ids[j]]))
            if w:
                out[row, col] = float(bool(y[row]) and any(part not in refs for part in w.split()))
    return out
