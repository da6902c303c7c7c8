"""Flow-checked generation: the output type and the streaming check with abstention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_flowcheck.extraction import FlowExtractor, FlowFeatures


@dataclass
class FlowGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus flow scores.

    The flow fields are returned when ``return_flow_scores=True`` (``flow_features`` when
    ``return_flow_features=True``; ``flow_running_scores``/``flow_abstained`` with a streaming check).

    Attributes:
        flow_scores: ``[batch]`` in ``[0, 1]``, higher = more likely hallucinated; ``nan`` for a row
            with no scored token (empty answer, or only special tokens), see ``flow_has_events``.
        flow_event_scores: ``[batch, B, T]`` per-event validator logits, ``-inf`` where ``flow_event_mask``
            is false.
        flow_event_mask: ``[batch, B, T]`` bool.
        flow_positions: ``[batch, T]`` sequence index of each ``T`` column, -1 for padding.
        flow_culprits: ``[batch, 2]`` long, ``(position t0, block b0)`` of the culprit event, -1 if none.
        flow_has_events: ``[batch]`` bool.
        flow_features: The :class:`~hf_flowcheck.FlowFeatures` (with ``return_flow_features=True``).
        flow_running_scores: ``[checks, batch]`` running scores of a streaming check (nan before a row
            has tokens or after it stopped), with ``flow_check_steps`` ``[checks]`` the generated-token
            counts at which they were taken.
        flow_abstained: ``[batch]`` bool, rows stopped by the streaming check.
        prompt_length: Columns of ``sequences`` that belong to the prompt.
    """

    flow_scores: torch.FloatTensor | None = None
    flow_event_scores: torch.FloatTensor | None = None
    flow_event_mask: torch.BoolTensor | None = None
    flow_positions: torch.LongTensor | None = None
    flow_culprits: torch.LongTensor | None = None
    flow_has_events: torch.BoolTensor | None = None
    flow_features: Any = None
    flow_running_scores: torch.FloatTensor | None = None
    flow_check_steps: torch.LongTensor | None = None
    flow_abstained: torch.BoolTensor | None = None
    prompt_length: int | None = None


class FlowStreamingCheck(LogitsProcessor):
    """Scores every row every ``check_every`` generated tokens; optionally abstains.

    Used through ``FlowCheckedModelForCausalLM.generate(..., flow_check_every=k,
    flow_abstain_threshold=x, flow_abstain_message="I am not sure.")``. At each check, each running
    row's answer so far is scored by the validator from the states already captured (no extra
    forward pass). A row whose running score exceeds ``abstain_threshold`` is steered to emit
    ``abstain_message`` and then its end-of-sequence token; its final flow score covers only the
    tokens before the abstention.

    Args:
        extractor: The extractor whose recorder is capturing this generation.
        validator: Scores features (``score_features``).
        prompt_length: Prompt columns of ``input_ids``.
        check_every: Check after every this many generated tokens (``>= 1``).
        abstain_threshold: Running score above which a row abstains (``None``: only record scores).
        abstain_ids: Token ids of the abstention message.
        eos_token_id: Ends an abstaining row.
    """

    def __init__(
        self,
        extractor: FlowExtractor,
        validator: Any,
        prompt_length: int,
        check_every: int,
        abstain_threshold: float | None = None,
        abstain_ids: list[int] | None = None,
        eos_token_id: int | None = None,
    ) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"flow_check_every={check_every!r} must be a positive integer.")
        if abstain_threshold is not None and not 0.0 <= float(abstain_threshold) <= 1.0:
            raise ValueError(f"flow_abstain_threshold={abstain_threshold!r} must lie in [0, 1].")
        if abstain_threshold is not None and eos_token_id is None:
            raise ValueError("Abstention needs an end-of-sequence token id (set generation_config.eos_token_id).")
        self.extractor = extractor
        self.validator = validator
        self.prompt_length = prompt_length
        self.check_every = check_every
        self.threshold = abstain_threshold
        self.abstain_ids = list(abstain_ids or [])
        self.eos = eos_token_id
        self.running: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.abstain_start: dict[int, int] = {}
        self._queue: dict[int, list[int]] = {}
        self._done: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n_gen = input_ids.shape[1] - self.prompt_length
        if n_gen > 0 and n_gen % self.check_every == 0:
            self._check(input_ids, n_gen)
        for row, queue in list(self._queue.items()):
            token = queue.pop(0) if queue else self.eos
            if not queue:
                del self._queue[row]
                self._done.add(row)
            scores[row] = -float("inf")
            scores[row, token] = 0.0
        return scores

    @torch.no_grad()
    def _check(self, input_ids: torch.Tensor, n_gen: int) -> None:
        rec = self.extractor.active_recorder
        batch = input_ids.shape[0]
        running = torch.full((batch,), float("nan"))
        if rec is None:
            return
        resp = torch.zeros_like(input_ids, dtype=torch.bool)
        resp[:, self.prompt_length :] = True
        mask = self.extractor.token_mask(input_ids, torch.ones_like(input_ids), resp)
        mask = self.final_mask(mask)
        ended = ~mask[:, -1] & ~self.extractor._before_first_eos(input_ids, resp)[:, -1]
        feats = self.extractor.features_from_states(input_ids, mask, rec.result())
        if feats.values.shape[2] > 0:
            out = self.validator.score_features(feats)
            running = out.scores.detach().float().cpu()
        running[ended.cpu()] = float("nan")
        for row in sorted(self.abstain_start):
            running[row] = float("nan")
        self.running.append(running)
        self.steps.append(n_gen)
        if self.threshold is None:
            return
        for row in range(batch):
            if row in self.abstain_start or bool(ended[row]):
                continue
            score = float(running[row])
            if score == score and score > self.threshold:
                self.abstain_start[row] = input_ids.shape[1]
                self._queue[row] = [*self.abstain_ids, self.eos]

    def final_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Drop the abstention message (and what follows) from a ``[batch, S]`` token mask."""
        if not self.abstain_start:
            return mask
        mask = mask.clone()
        for row, start in self.abstain_start.items():
            mask[row, start:] = False
        return mask

    def summary(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(running [checks, batch], steps [checks], abstained [batch])``."""
        running = torch.stack(self.running) if self.running else torch.zeros(0, batch)
        steps = torch.tensor(self.steps, dtype=torch.long)
        abstained = torch.zeros(batch, dtype=torch.bool)
        for row in self.abstain_start:
            abstained[row] = True
        return running, steps, abstained


def empty_features_like(feats: FlowFeatures) -> bool:
    """True when no row has a scored token."""
    return feats.values.shape[2] == 0
