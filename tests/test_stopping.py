"""AnswerLineStop: a row ends at the first newline after answer text, never at a leading one."""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteriaList

from hf_flowcheck.stopping import AnswerLineStop, bind_prompt_width

TEXTS = ["<pad>", "\n", " ", "foo", "bar\n", "\n\n", " x", "\nbaz"]


class _Tok:
    """The three tokenizer methods AnswerLineStop uses, over a fixed vocabulary."""

    def __len__(self):
        return len(TEXTS)

    def get_vocab(self):
        return {t: i for i, t in enumerate(TEXTS)}

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["".join("" if (skip_special_tokens and i == 0) else TEXTS[i] for i in s) for s in seqs]


@pytest.mark.parametrize(
    "generated, stops",
    [
        ([1, 1, 3], False),  # leading blank lines, then text still on its line
        ([1, 3, 1], True),  # text, then its newline
        ([4], True),  # one token holding text and newline
        ([2, 5], False),  # only whitespace so far
        ([3, 6], False),  # text, no newline yet
        ([1, 7], False),  # the newline precedes the text inside the token
        ([1, 7, 1], True),
        ([3, 40], False),  # an id past the tokenizer (padded embedding) is text, not a newline
        ([40, 1], True),
    ],
)
def test_stops_only_after_answer_text(generated, stops):
    stop = AnswerLineStop(_Tok()).for_prompt(2)
    ids = torch.tensor([[3, 3, *generated]])
    assert stop(ids, None).tolist() == [stops]


def test_rows_are_independent_and_the_prompt_is_ignored():
    stop = AnswerLineStop(_Tok(), 3)
    ids = torch.tensor([[3, 1, 3, 1, 1, 0], [0, 0, 3, 3, 1, 0], [0, 4, 4, 1, 1, 1]])
    # row 0: generated [1, 1, 0] blank; row 1: [3, 1, 0] stops; row 2: [1, 1, 1] blank (prompt's "bar\n" ignored)
    assert stop(ids, None).tolist() == [False, True, False]
    assert stop(ids[:, :3], None).tolist() == [False, False, False]


def test_binding_and_errors():
    base = AnswerLineStop(_Tok())
    with pytest.raises(ValueError, match="for_prompt"):
        base(torch.tensor([[3, 1]]), None)
    with pytest.raises(ValueError, match="non-negative"):
        base.for_prompt(-1)
    kwargs = {"stopping_criteria": StoppingCriteriaList([base]), "max_new_tokens": 4}
    bound = bind_prompt_width(kwargs, 5)
    assert isinstance(bound["stopping_criteria"], StoppingCriteriaList)
    assert bound["stopping_criteria"][0].prompt_width == 5 and base.prompt_width is None
    assert bound["max_new_tokens"] == 4
    assert bind_prompt_width({"max_new_tokens": 4}, 5) == {"max_new_tokens": 4}
