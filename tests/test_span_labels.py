"""Human error spans (character offsets) become token labels that cover exactly the marked text."""

from __future__ import annotations

import json
import re

import pytest

from hf_flowcheck.data import resolve_data_dir
from hf_flowcheck.workflows.token_labels import sentence_of_tokens, span_token_labels


def _word_offsets(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def test_span_labels_mark_overlapping_tokens_and_say_when_they_are_incomplete() -> None:
    text = "Paris is in Spain. It is old."
    offsets = _word_offsets(text)
    start = text.index("in Spain")
    labels, complete = span_token_labels(offsets, [(start, start + len("in Spain"))])
    assert [w for w, y in zip(text.split(), labels, strict=True) if y] == ["in", "Spain."] and complete
    assert span_token_labels(offsets[:2], [(start, start + 8)]) == ([0, 0], False)  # cut before the span
    assert span_token_labels(offsets, [None])[1] is False  # a span the source could not place
    assert span_token_labels(offsets, []) == ([0] * 7, True)
    assert sentence_of_tokens(text, offsets) == [0, 0, 0, 0, 1, 1, 1]
    assert sentence_of_tokens("One\n\nTwo three", _word_offsets("One\n\nTwo three")) == [0, 1, 1]


@pytest.mark.real_model
def test_haluquestqa_spans_land_on_the_tokens_of_their_text(smollm2) -> None:
    _, tok = smollm2
    path = resolve_data_dir() / "haluquestqa" / "haluquestqa_factuality_spans.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not here (the shared data folder holds it)")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    checked = 0
    for rec in [r for r in records if r["has_factuality_error"]][:40]:
        enc = tok(rec["answer"], add_special_tokens=False, return_offsets_mapping=True)
        spans = [None if s["start"] is None else (s["start"], s["end"]) for s in rec["factuality_error_spans"]]
        labels, complete = span_token_labels([tuple(o) for o in enc.offset_mapping], spans)
        assert complete == all(s is not None for s in spans)
        marked = tok.decode([i for i, y in zip(enc.input_ids, labels, strict=True) if y])
        for s in spans:
            if s is not None:
                words = rec["answer"][s[0] : s[1]].split()
                assert " ".join(words[1:-1]) in " ".join(marked.split())  # inner words, whatever the edges
                checked += 1
    assert checked >= 40
