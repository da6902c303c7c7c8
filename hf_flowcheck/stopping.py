"""Stop a generated answer at the end of its first line, not at a leading blank line.

Small chat models often start an answer after ``"Answer:"`` with a newline. A plain
``stop_strings=["\\n"]`` then ends the row before any answer text, which leaves an empty answer
(21% of SmolLM2-135M's HaluEval-QA answers with the 2-shot prompt). :class:`AnswerLineStop` ends a
row at the first newline that follows non-blank text, so the judged answer is the first non-empty
line, exactly what :func:`hf_flowcheck.data.clean_generation` keeps.

Example:
    >>> stop = AnswerLineStop(tokenizer)                        # doctest: +SKIP
    >>> model.generate(ids, stopping_criteria=[stop.for_prompt(ids.shape[1])])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria

from hf_flowcheck.tokens import TokenTable, token_table

__all__ = ["AnswerLineStop", "bind_prompt_width", "supports_answer_line_stop"]


def supports_answer_line_stop(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` offers what :class:`AnswerLineStop` reads (``get_vocab``, ``batch_decode``)."""
    return hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "batch_decode")


class AnswerLineStop(StoppingCriteria):
    """Ends each row at the first newline that comes after non-blank generated text.

    Build it once per tokenizer (it decodes the vocabulary once), then bind it to a batch's prompt
    width with :meth:`for_prompt` (cheap; the tables are shared).

    Args:
        tokenizer: A transformers tokenizer (``batch_decode`` and ``get_vocab`` are used).
        prompt_width: Length of the (padded) prompt; generated tokens start there. ``None`` until
            bound by :meth:`for_prompt`.

    Raises:
        ValueError: Called before a prompt width was bound.
    """

    def __init__(self, tokenizer: Any, prompt_width: int | None = None, *, _table: TokenTable | None = None):
        self._table = _table if _table is not None else token_table(tokenizer)
        self._tokenizer = tokenizer
        self.prompt_width = prompt_width
        self._on: dict[torch.device, TokenTable] = {}

    def for_prompt(self, prompt_width: int) -> AnswerLineStop:
        """A criterion for prompts of ``prompt_width`` tokens, sharing this one's tables."""
        if isinstance(prompt_width, bool) or not isinstance(prompt_width, int) or prompt_width < 0:
            raise ValueError(f"prompt_width={prompt_width!r} must be a non-negative integer.")
        return AnswerLineStop(self._tokenizer, prompt_width, _table=self._table)

    def _table_on(self, device: torch.device) -> TokenTable:
        if device not in self._on:
            self._on[device] = self._table.to(device)
        return self._on[device]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        """Returns a ``(B,)`` bool tensor: row ``i`` has finished its first non-empty line.

        Args:
            input_ids: ``(B, prompt_width + t)`` prompt and generated tokens.
            scores: Unused.
        """
        if self.prompt_width is None:
            raise ValueError(
                "AnswerLineStop has no prompt width; pass stop.for_prompt(input_ids.shape[1]) to generate()."
            )
        gen = input_ids[:, self.prompt_width :]
        if gen.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tab = self._table_on(input_ids.device)
        inside = gen < tab.blank.shape[0]  # ids past the tokenizer (padded embeddings): text, no newline
        gen = gen.clamp(0, tab.blank.shape[0] - 1)
        nonblank = ~tab.blank[gen] | ~inside
        seen_text = (nonblank.long().cumsum(1) - nonblank.long()) > 0  # non-blank token strictly before j
        ends_line = tab.has_newline[gen] & inside & (seen_text | tab.text_before_newline[gen])
        return ends_line.any(dim=1)

    def __repr__(self) -> str:
        return f"AnswerLineStop(prompt_width={self.prompt_width})"


def bind_prompt_width(generate_kwargs: dict[str, Any], prompt_width: int) -> dict[str, Any]:
    """``generate_kwargs`` with every unbound :class:`AnswerLineStop` bound to ``prompt_width``."""
    criteria = generate_kwargs.get("stopping_criteria")
    if not criteria or not any(isinstance(c, AnswerLineStop) for c in criteria):
        return generate_kwargs
    bound = [c.for_prompt(prompt_width) if isinstance(c, AnswerLineStop) else c for c in criteria]
    return {**generate_kwargs, "stopping_criteria": type(criteria)(bound)}
