"""What each token of a vocabulary decodes to: one table per tokenizer, shared by every reader.

The newline stop (:mod:`hf_flowcheck.stopping`) and the token mask that leaves an answer's
terminators out of its score (:meth:`hf_flowcheck.extraction.FlowExtractor.token_mask`) both ask
which tokens are whitespace only, and the culprit rule which tokens carry a word; decoding a 150k
vocabulary takes seconds, so it is done once per tokenizer and kept for as long as the tokenizer
lives.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

__all__ = ["TokenTable", "answer_token_count", "token_table"]


@dataclass(frozen=True)
class TokenTable:
    """Per-token facts, each a bool tensor of shape ``(V,)``.

    Attributes:
        has_newline: The token's text contains a newline.
        blank: The token decodes to whitespace only (or nothing).
        text_before_newline: Non-blank text precedes the token's first newline.
        has_word: The token's text has a word character (``\\w``: a letter, digit or underscore):
            only such a token can be a culprit (:meth:`hf_flowcheck.extraction.FlowExtractor.word_tokens`).
    """

    has_newline: torch.Tensor
    blank: torch.Tensor
    text_before_newline: torch.Tensor
    has_word: torch.Tensor

    def to(self, device: torch.device) -> TokenTable:
        return TokenTable(*(getattr(self, f.name).to(device) for f in fields(self)))


# The same "word character" the weak token labels use (hf_flowcheck.workflows.token_labels.words).
_WORD = re.compile(r"\w")
_TABLES: weakref.WeakKeyDictionary[Any, TokenTable] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _build(tokenizer: Any) -> TokenTable:
    size = max(getattr(tokenizer, "__len__", lambda: 0)(), max(tokenizer.get_vocab().values()) + 1)
    texts = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=True)
    has_nl = torch.tensor(["\n" in s for s in texts])
    blank = torch.tensor([s.strip() == "" for s in texts])
    before = torch.tensor([s.split("\n", 1)[0].strip() != "" for s in texts])
    word = torch.tensor([_WORD.search(s) is not None for s in texts])
    return TokenTable(has_nl, blank, before, word)


def token_table(tokenizer: Any) -> TokenTable:
    """The :class:`TokenTable` of ``tokenizer`` (built on first use, then cached per tokenizer object).

    Raises:
        TypeError: ``tokenizer`` lacks ``get_vocab``/``batch_decode``.
    """
    if not (hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "batch_decode")):
        raise TypeError(f"{type(tokenizer).__name__} has no get_vocab/batch_decode; pass a transformers tokenizer.")
    with _LOCK:
        try:
            return _TABLES[tokenizer]
        except (KeyError, TypeError):
            pass
    table = _build(tokenizer)
    with _LOCK, contextlib.suppress(TypeError):  # not weak-referenceable: rebuilt next time
        _TABLES[tokenizer] = table
    return table


def answer_token_count(tokenizer: Any, gen: list[int], answer: str, postprocess: Callable[[str], str] | None) -> int:
    """Fewest leading generated tokens whose decoded, post-processed text is the judged ``answer``.

    ``postprocess=None``: the whole generation is the answer.
    """
    if postprocess is None:
        return len(gen)
    for k in range(len(gen) + 1):
        if postprocess(tokenizer.decode(gen[:k], skip_special_tokens=True)) == answer:
            return k
    return len(gen)
