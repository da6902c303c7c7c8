"""Token-level risk while the model writes: a streamer in transformers' streamer protocol.

:class:`FlowTextStreamer` is given to a flow-checked ``generate(..., streamer=...)`` like
transformers' ``TextIteratorStreamer``. It yields :class:`FlowStreamChunk` objects: each new piece
of text with the running flow score of the answer so far and the per-token risks of the tokens in
the piece. A terminal can colour the text by risk (``on_chunk=``), a web handler can iterate over
it while ``generate`` runs in another thread, and either can :meth:`~FlowTextStreamer.cancel` the
generation.

Why text is held back: ``generate`` hands the streamer each token as soon as it is chosen, but the
token's own states are captured only when the model reads it back at the next step; its risk is
known one step later. A piece is emitted when the streaming check has scored it (every
``flow_check_every`` tokens), and the last piece when the final score is known.
"""

from __future__ import annotations

import math
import queue
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

__all__ = ["FlowStreamChunk", "FlowTextStreamer"]


@dataclass
class FlowStreamChunk:
    """One piece of streamed text with its flow evidence.

    Attributes:
        text: New text since the previous chunk.
        token_ids: The tokens of this piece.
        score: Running flow score of the whole answer so far, in ``[0, 1]`` (``nan`` before any
            token is scored). On the ``final`` chunk: the final score ``generate`` returns.
        token_risks: One risk per token of ``token_ids`` in ``[0, 1]``: the score the answer would get
            if all of its flow evidence were this token's (:func:`~hf_flowcheck.generation.token_risk`);
            ``nan`` for a token that is not scored, such as an end token.
        final: The last chunk of the answer.
    """

    text: str
    token_ids: list[int]
    score: float
    token_risks: list[float] = field(default_factory=list)
    final: bool = False


_END = object()


class FlowTextStreamer(BaseStreamer):
    """Streams text with running flow scores; iterate over it, or pass ``on_chunk``.

    Args:
        tokenizer: Decodes the tokens.
        skip_special_tokens: Passed to ``tokenizer.decode``.
        on_chunk: Called with each :class:`FlowStreamChunk` inside ``generate`` (an exception it
            raises stops ``generate``, hooks removed).
        timeout: Seconds an iterating consumer waits for the next chunk (``None``: forever).

    Example:
        >>> from threading import Thread  # doctest: +SKIP
        >>> streamer = FlowTextStreamer(tok)  # doctest: +SKIP
        >>> kw = dict(**enc, streamer=streamer, max_new_tokens=32)  # doctest: +SKIP
        >>> Thread(target=model.generate, kwargs=kw).start()  # doctest: +SKIP
        >>> for chunk in streamer:  # doctest: +SKIP
        ...     print(chunk.text, f"{chunk.score:.2f}")
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        skip_special_tokens: bool = True,
        on_chunk: Callable[[FlowStreamChunk], None] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.on_chunk = on_chunk
        self.timeout = timeout
        self.chunks: list[FlowStreamChunk] = []
        self._queue: queue.Queue = queue.Queue()
        self._reset()

    def _reset(self) -> None:
        # A reused streamer never replays its previous answer: drop what its last consumer left
        # (the same queue object, so a consumer already waiting on it gets the new answer).
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self.chunks = []
        self._ids: list[int] = []
        self._risks: dict[int, float] = {}
        self._emitted = 0
        self._text = ""
        self._prompt_seen = False
        self._prompt_length = 0
        self._flow_run = False
        self._closed = False
        self.cancelled = False
        self.error: BaseException | None = None

    # ------------------------------------------------------------------ transformers' protocol
    def put(self, value: torch.Tensor) -> None:
        """Receives the prompt (first call, skipped) and then each new token (batch of one)."""
        if not self._prompt_seen or self._closed:
            if self._closed:  # a new plain generate() on a streamer whose last answer ended
                self._reset()
            self._prompt_seen = True
            return
        if value.dim() > 1 and value.shape[0] != 1:
            raise ValueError(
                f"FlowTextStreamer streams one answer; generate() gave it a batch of {value.shape[0]}. Stream one "
                "prompt at a time (as transformers' streamers do), or drop streamer= and read flow_running_scores."
            )
        self._ids.extend(int(t) for t in value.reshape(-1).tolist())
        if not self._flow_run:  # a plain generate(): no scores will come, stream the text as it arrives
            self._emit(len(self._ids), float("nan"), final=False)

    def end(self) -> None:
        """Called by ``generate``; a flow-checked call ends the stream itself, once the final score is known."""
        if not self._flow_run:
            self._emit(len(self._ids), float("nan"), final=True)
            self._close()

    # -------------------------------------------------------------------- the flow side
    def begin_flow(self, prompt_length: int) -> None:
        """Called by the flow-checked ``generate`` before it starts (resets the stream).

        Args:
            prompt_length: Sequence index of the first generated token (maps the risks' positions
                to the streamed tokens).
        """
        if self._prompt_seen and not self._closed:
            raise RuntimeError(
                "This FlowTextStreamer is still streaming another answer; make one streamer per request "
                "(FlowTextStreamer(tokenizer)) or wait until its stream ends."
            )
        self._reset()
        self._flow_run = True
        self._prompt_length = int(prompt_length)

    def on_check(self, n_generated: int, scores: torch.Tensor, risks: torch.Tensor, positions: torch.Tensor) -> None:
        """A streaming check's result (row 0): emit the tokens it scored.

        Args:
            n_generated: Tokens generated so far.
            scores: ``[1]`` running score.
            risks: ``[1, T]`` per-token risks.
            positions: ``[1, T]`` their sequence indices.
        """
        self._take_risks(risks, positions)
        score = float(scores.reshape(-1)[0]) if scores.numel() else float("nan")
        self._emit(min(n_generated, len(self._ids)), score, final=False)

    def finish(self, score: float, risks: torch.Tensor, positions: torch.Tensor) -> None:
        """The final score (and final per-token risks): emit the rest and end the stream."""
        self._take_risks(risks, positions)
        self._emit(len(self._ids), float(score), final=True)
        self._close()

    def close(self, error: BaseException | None = None) -> None:
        """End the stream without a final score (``generate`` failed with ``error``)."""
        if not self._closed:
            self.error = error
            self._close()

    def cancel(self) -> None:
        """Ask the running flow-checked ``generate`` to stop after the current token."""
        self.cancelled = True

    def _take_risks(self, risks: torch.Tensor, positions: torch.Tensor) -> None:
        if risks.numel() == 0:
            return
        self._risks = {}
        for pos, risk in zip(positions.reshape(-1).tolist(), risks.reshape(-1).tolist()):
            if pos >= 0:
                self._risks[int(pos)] = float(risk)

    def _emit(self, upto: int, score: float, *, final: bool) -> None:
        if self._closed or (upto <= self._emitted and not final):
            return
        text = self.tokenizer.decode(self._ids[:upto], skip_special_tokens=self.skip_special_tokens)
        # A multi-byte character split across tokens decodes to U+FFFD until its last token arrives.
        if text.endswith("\ufffd") and not final:
            return
        new_ids = self._ids[self._emitted : upto]
        risks = [self._risks.get(self._prompt_length + i, math.nan) for i in range(self._emitted, upto)]
        chunk = FlowStreamChunk(text[len(self._text) :], new_ids, score, risks, final)
        self._emitted, self._text = upto, text
        self.chunks.append(chunk)
        self._queue.put(chunk)
        if self.on_chunk is not None:
            self.on_chunk(chunk)

    def _close(self) -> None:
        self._closed = True
        self._queue.put(_END)

    # --------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[FlowStreamChunk]:
        return self

    def __next__(self) -> FlowStreamChunk:
        item = self._queue.get(timeout=self.timeout)
        if item is _END:
            if self.error is not None:
                raise RuntimeError(f"generate() failed while streaming: {self.error}") from self.error
            raise StopIteration
        return item

    @property
    def text(self) -> str:
        """All text streamed so far."""
        return self._text
