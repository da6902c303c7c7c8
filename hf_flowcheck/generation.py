"""Generation with flow capture: the output type, capture during ``generate``, and the streaming check.

:func:`flow_generate` is what ``FlowCheckedModelForCausalLM.generate(..., return_flow_scores=True)``
runs: one ``generate`` call with capture hooks (:class:`GenerationCapture`), an optional
:class:`FlowStreamingCheck` among the logits processors, and the validator's scores attached to a
:class:`FlowGenerateOutput`. Teacher-forced extraction and the assembly of signatures from captured
states belong to :class:`~hf_flowcheck.extraction.FlowExtractor`; this module never changes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_flowcheck.capture import FlowRecorder
from hf_flowcheck.extraction import FlowExtractor, FlowFeatures, StreamCache
from hf_flowcheck.model_io import accepts, cache_keyword, output_cache_field
from hf_flowcheck.streamer import FlowTextStreamer

__all__ = [
    "CheckListener",
    "FlowGenerateOutput",
    "FlowStreamingCheck",
    "GenerationCapture",
    "RunningScores",
    "Scorer",
    "attach_scores",
    "capture_generate",
    "check_generate_kwargs",
    "flow_generate",
    "token_risk",
]


@dataclass
class RunningScores:
    """What one streaming check found, for every row of the batch.

    Attributes:
        scores: ``[batch]`` running flow score of each row's answer so far (``nan`` where a row has
            no scored token yet, or has ended).
        ended: ``[batch]`` bool, rows that already emitted their end token.
        token_risk: ``[batch, T]`` for each scored token, :func:`token_risk` of the validator's
            token logits (``nan`` in padding columns).
        positions: ``[batch, T]`` sequence index of each ``token_risk`` column (-1 for padding).
    """

    scores: torch.Tensor
    ended: torch.Tensor
    token_risk: torch.Tensor
    positions: torch.Tensor


#: ``scorer(input_ids [batch, S], excluded [batch, S] bool) -> RunningScores``: scores each row's
#: answer so far from the captured states, leaving out the ``excluded`` positions.
Scorer = Callable[[torch.Tensor, torch.Tensor], RunningScores]
#: ``listener(n_generated, running)``: told the result of every streaming check (a streamer).
CheckListener = Callable[[int, RunningScores], None]


def token_risk(token_logits: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` validator token logits -> ``[N, T]`` per-token risk in ``[0, 1]``.

    A token's risk is the score the answer would get if all of its flow evidence were this token's
    (``FlowValidatorOutput.token_logits``): on the answer score's scale, which the answer score
    averages (attention head) or takes the maximum of (max pooling). ``nan`` for a column without
    events (padding, special tokens).
    """
    return torch.sigmoid(token_logits.float())


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
        flow_token_scores: ``[batch, T]`` per-token risk in ``[0, 1]`` (:func:`token_risk`), ``nan``
            for a column without events.
        flow_positions: ``[batch, T]`` sequence index of each ``T`` column, -1 for padding.
        flow_culprits: ``[batch, 2]`` long, ``(position t0, block b0)`` of the culprit: the riskiest
            answer token (the largest ``flow_token_scores``) and the block of its largest event logit;
            -1 if none.
        flow_has_events: ``[batch]`` bool.
        flow_features: The :class:`~hf_flowcheck.FlowFeatures` (with ``return_flow_features=True``).
        flow_running_scores: ``[checks, batch]`` running scores of a streaming check (nan before a row
            has tokens or after it stopped), with ``flow_check_steps`` ``[checks]`` the generated-token
            counts at which they were taken.
        flow_abstained: ``[batch]`` bool, rows stopped by the streaming check.
        prompt_length: Columns of ``sequences`` that belong to the prompt.
        prompt_attention_mask: ``[batch, prompt_length]`` the prompt's attention mask (``refine`` reads
            it, so it need not be passed again).
        flow_rolled_back: ``[batch]`` bool, rows that crossed ``flow_rollback_threshold`` and were
            rolled back and regenerated in the call (their ``sequences`` and flow fields are the refined
            answer's; ``past_key_values`` is then ``None``).
        flow_refinement: The :class:`~hf_flowcheck.FlowRefineOutput` of those rollbacks (scores before,
            culprits, clamp statistics).
        flow_source: The :class:`~hf_flowcheck.extraction.FeatureSource` (model fingerprint and flow
            config) that made this output; ``refine`` refuses an output of another model.
    """

    flow_scores: torch.FloatTensor | None = None
    flow_event_scores: torch.FloatTensor | None = None
    flow_event_mask: torch.BoolTensor | None = None
    flow_token_scores: torch.FloatTensor | None = None
    flow_positions: torch.LongTensor | None = None
    flow_culprits: torch.LongTensor | None = None
    flow_has_events: torch.BoolTensor | None = None
    flow_features: Any = None
    flow_running_scores: torch.FloatTensor | None = None
    flow_check_steps: torch.LongTensor | None = None
    flow_abstained: torch.BoolTensor | None = None
    prompt_length: int | None = None
    prompt_attention_mask: torch.LongTensor | None = None
    flow_rolled_back: torch.BoolTensor | None = None
    flow_refinement: Any = None
    flow_source: Any = None


class FlowStreamingCheck(LogitsProcessor):
    """Scores every row every ``check_every`` generated tokens; optionally abstains.

    Used through ``FlowCheckedModelForCausalLM.generate(..., flow_check_every=k,
    flow_abstain_threshold=x, flow_abstain_message="I am not sure.")``. At each check the ``scorer``
    scores each running row's answer so far (from the states already captured: no extra forward
    pass). A row whose running score exceeds ``abstain_threshold`` is steered to emit
    ``abstain_ids`` and then its end-of-sequence token; its final flow score covers only the tokens
    before the abstention (:meth:`final_mask`).

    Args:
        scorer: See :data:`Scorer`.
        prompt_length: Prompt columns of ``input_ids``.
        check_every: Check after every this many generated tokens (``>= 1``).
        abstain_threshold: Running score above which a row abstains (``None``: only record scores).
        abstain_ids: Token ids of the abstention message.
        eos_token_id: Ends an abstaining row.
        max_new_tokens: The call's budget. A row that abstains too close to it for the whole message
            ends with its end token alone: a message is never cut mid-word.
        listener: Told every check's :class:`RunningScores` (a :class:`~hf_flowcheck.FlowTextStreamer`).
    """

    def __init__(
        self,
        scorer: Scorer,
        prompt_length: int,
        check_every: int,
        abstain_threshold: float | None = None,
        abstain_ids: list[int] | None = None,
        eos_token_id: int | None = None,
        max_new_tokens: int | None = None,
        listener: CheckListener | None = None,
    ) -> None:
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"flow_check_every={check_every!r} must be a positive integer.")
        if abstain_threshold is not None and not 0.0 <= float(abstain_threshold) <= 1.0:
            raise ValueError(f"flow_abstain_threshold={abstain_threshold!r} must lie in [0, 1].")
        if abstain_threshold is not None and eos_token_id is None:
            raise ValueError("Abstention needs an end-of-sequence token id (set generation_config.eos_token_id).")
        self.scorer = scorer
        self.prompt_length = prompt_length
        self.check_every = check_every
        self.threshold = abstain_threshold
        self.abstain_ids = list(abstain_ids or [])
        self.eos = eos_token_id
        self.max_new_tokens = max_new_tokens
        self.listener = listener
        self.running: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.abstain_start: dict[int, int] = {}
        self._queue: dict[int, list[int]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n_gen = input_ids.shape[1] - self.prompt_length
        if n_gen > 0 and n_gen % self.check_every == 0:
            self._check(input_ids, n_gen)
        if not self._queue:
            return scores
        forced = scores.clone()
        for row, queue in list(self._queue.items()):
            token = queue.pop(0) if queue else self.eos
            if not queue:
                del self._queue[row]
            forced[row] = -float("inf")
            forced[row, token] = 0.0
        return forced

    @torch.no_grad()
    def _check(self, input_ids: torch.Tensor, n_gen: int) -> None:
        batch = input_ids.shape[0]
        excluded = ~self.final_mask(torch.ones_like(input_ids, dtype=torch.bool))
        result = self.scorer(input_ids, excluded)
        running = result.scores.detach().float().cpu().clone()
        ended = result.ended.cpu()
        running[ended] = float("nan")
        for row in sorted(self.abstain_start):
            running[row] = float("nan")
        self.running.append(running)
        self.steps.append(n_gen)
        if self.listener is not None:
            self.listener(n_gen, RunningScores(running, ended, result.token_risk.cpu(), result.positions.cpu()))
        if self.threshold is None:
            return
        for row in range(batch):
            if row in self.abstain_start or bool(ended[row]):
                continue
            score = float(running[row])
            if score == score and score > self.threshold:
                self.abstain_start[row] = input_ids.shape[1]
                left = None if self.max_new_tokens is None else self.max_new_tokens - n_gen
                fits = left is None or len(self.abstain_ids) <= left
                self._queue[row] = [*self.abstain_ids, self.eos] if fits else [self.eos]

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


def check_generate_kwargs(model: Any, kw: dict[str, Any]) -> None:
    """Refuse the decoding modes whose per-token states cannot be attributed while they run."""
    gen_cfg = kw.get("generation_config") or getattr(model, "generation_config", None)
    beams = kw.get("num_beams", getattr(gen_cfg, "num_beams", 1) if gen_cfg is not None else 1) or 1
    if beams > 1:
        raise ValueError(
            f"num_beams={beams} is not supported: beam search reorders and discards hypotheses, so "
            "per-token states cannot be attributed while it runs. Use greedy or sampling "
            "(num_beams=1), or beam-search first and score the result with FlowExtractor.extract()."
        )
    for key in ("assistant_model", "prompt_lookup_num_tokens"):
        if kw.get(key) is not None:
            raise ValueError(f"{key} (assisted decoding) is not supported with flow capture; remove it.")
    if "inputs_embeds" in kw:
        raise ValueError("inputs_embeds is not supported; pass input_ids.")


class GenerationCapture:
    """Capture hooks for one ``generate`` call: prompt states (``token_mask='all'``) and each new token's.

    Use as a context manager around ``model.generate``; :meth:`running_scorer` scores the tokens so
    far (streaming checks) and :meth:`finish` returns the features of the whole output.

    Args:
        extractor: Supplies the architecture, the token mask and the assembly of signatures.
        input_ids: ``[N, P]`` prompts.
        attention_mask: ``[N, P]``.
        max_new_tokens: Budget (sizes the capture buffers; they grow if needed).
        extra_eos: End ids given to this ``generate`` call (``eos_token_id=``): they end an answer
            and are never scored, as the model's own end ids.
        refit: When streaming checks refit the window bases (see :class:`StreamCache`); the final
            features always refit, so they equal the teacher-forced extraction.
    """

    def __init__(
        self,
        extractor: FlowExtractor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        extra_eos: frozenset[int] = frozenset(),
        refit: str = "always",
    ) -> None:
        self.extractor = extractor
        self.extra_eos = extra_eos
        self.prompt_length = input_ids.shape[1]
        self.attention_mask = attention_mask
        prompt_mask = (
            extractor.token_mask(input_ids, attention_mask, None)
            if extractor.config.token_mask == "all"
            else torch.zeros_like(input_ids, dtype=torch.bool)
        )
        if extractor.reads_predicting_positions:
            prompt_mask = extractor.capture_mask(prompt_mask, attention_mask)
            prompt_mask[:, -1] |= attention_mask[:, -1].bool()  # it predicts the first new token
        p_rows, p_cols = prompt_mask.nonzero(as_tuple=True)
        prompt_len = self.prompt_length

        def selector(call: int, batch: int, seq: int, device: torch.device):
            if call == 0:
                return (p_rows, p_cols, p_cols) if p_rows.numel() else None
            rows = torch.arange(batch, device=device)
            cols = torch.full((batch,), seq - 1, device=device, dtype=torch.long)
            return rows, cols, torch.full_like(rows, prompt_len + call - 1)

        capacity = p_rows.numel() + input_ids.shape[0] * int(max_new_tokens)
        self.recorder = FlowRecorder(extractor.arch, selector, capacity=capacity)
        self.cache = StreamCache(refit)

    def __enter__(self) -> GenerationCapture:
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.recorder.__exit__(*exc)

    def _full_attention(self, seqs: torch.Tensor) -> torch.Tensor:
        att = self.attention_mask.to(seqs.device)
        return torch.cat([att, torch.ones_like(seqs[:, self.prompt_length :], dtype=att.dtype)], dim=1)

    def _token_mask(self, seqs: torch.Tensor, full_att: torch.Tensor) -> torch.Tensor:
        resp = torch.zeros_like(seqs, dtype=torch.bool)
        resp[:, self.prompt_length :] = True
        return self.extractor.token_mask(seqs, full_att, resp, self.extra_eos)

    def running_scorer(self, validator: Any) -> Scorer:
        """A :data:`Scorer` over the states captured so far, scored by ``validator.score_features``."""
        ext = self.extractor

        def score(input_ids: torch.Tensor, excluded: torch.Tensor) -> RunningScores:
            full_att = self._full_attention(input_ids)
            mask = self._token_mask(input_ids, full_att) & ~excluded.to(input_ids.device)
            resp = torch.zeros_like(input_ids, dtype=torch.bool)
            resp[:, self.prompt_length :] = True
            ended = ~mask[:, -1] & ~ext.before_first_eos(input_ids, resp, self.extra_eos)[:, -1]
            feats = ext.features_from_states(input_ids, full_att, mask, self.recorder.result(), self.cache)
            n = input_ids.shape[0]
            if feats.values.shape[2] == 0:
                empty = torch.zeros(n, 0)
                return RunningScores(torch.full((n,), float("nan")), ended, empty, empty.long())
            out = validator.score_features(feats)
            return RunningScores(out.scores, ended, token_risk(out.token_logits), feats.positions)

        return score

    def finish(self, output: Any, mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> FlowFeatures:
        """Features of the generated tokens (plus the prompt's for ``token_mask='all'``).

        Args:
            output: ``generate``'s dict output (``sequences``, ``past_key_values``).
            mask_fn: Optional edit of the final ``[N, S]`` token mask (a streaming check leaves an
                abstention message out of the score).
        """
        seqs = output.sequences
        full_att = self._full_attention(seqs)
        mask = self._token_mask(seqs, full_att)
        if mask_fn is not None:
            mask = mask_fn(mask)
        if seqs.shape[1] > self.prompt_length and bool(mask[:, -1].any()):
            # generate never feeds its last token back; one more step gives its states.
            self._final_step(output, seqs, full_att)
        states = self.recorder.result()
        return self.extractor.features_from_states(seqs, full_att, mask, states, self.cache.exact())

    def _final_step(self, out: Any, seqs: torch.Tensor, full_att: torch.Tensor) -> None:
        ext = self.extractor
        cache = getattr(out, output_cache_field(out), None)
        cache_len = seqs.shape[1] - 1
        if _can_extend_and_crop(cache, cache_len):
            pos = (full_att.long().cumsum(-1) - 1).clamp_min(0)[:, -1:]
            kwargs: dict[str, Any] = {"attention_mask": full_att, cache_keyword(ext.base): cache, "use_cache": True}
            if accepts(ext.base, "position_ids"):
                kwargs["position_ids"] = pos
            if accepts(ext.base, "cache_position"):
                kwargs["cache_position"] = torch.tensor([cache_len], device=seqs.device)
            if accepts(ext.base, "logits_to_keep"):
                kwargs["logits_to_keep"] = 1
            ext.model(input_ids=seqs[:, -1:], **kwargs)
            cache.crop(-1)  # give the caller back the cache generate produced
            return
        # No croppable cache: replay the whole sequence once; the selector keeps its last position.
        ext.forward(seqs, full_att)


class _Cancelled(StoppingCriteria):
    """Stops generation once the consumer of a :class:`~hf_flowcheck.FlowTextStreamer` cancelled it."""

    def __init__(self, streamer: FlowTextStreamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full(
            (input_ids.shape[0],), bool(self.streamer.cancelled), dtype=torch.bool, device=input_ids.device
        )


def _can_extend_and_crop(cache: Any, cache_len: int) -> bool:
    if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
        return False
    if cache.get_seq_length() != cache_len:
        return False
    for layer in getattr(cache, "layers", []):
        window = getattr(layer, "sliding_window", None)
        if window is not None and cache_len + 1 >= window:
            return False  # a full sliding-window layer cannot be cropped back
        if type(layer).__name__.startswith("Static"):
            return False
    return True


def _call_eos(generate_kwargs: dict[str, Any]) -> frozenset[int]:
    """End ids given to this call (``eos_token_id=`` or its ``generation_config``)."""
    from hf_flowcheck.model_io import as_token_ids

    gen_cfg = generate_kwargs.get("generation_config")
    value = generate_kwargs.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))
    return frozenset(as_token_ids(value))


def _max_new_tokens(model: Any, generate_kwargs: dict[str, Any]) -> int:
    gen_cfg = generate_kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return int(generate_kwargs.get("max_new_tokens") or getattr(gen_cfg, "max_new_tokens", None) or 32)


@torch.no_grad()
def capture_generate(
    extractor: FlowExtractor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs: Any,
) -> tuple[Any, FlowFeatures]:
    """Generate and capture flow signatures of the generated tokens in the same pass.

    Args:
        extractor: The extractor of the model that generates.
        input_ids: ``[N, P]`` prompts (left padding for batches).
        attention_mask: ``[N, P]``.
        **generate_kwargs: Passed to ``model.generate`` (``num_beams > 1`` is refused).

    Returns:
        ``(output, features)``: what ``model.generate`` returns for these arguments, and the
        :class:`~hf_flowcheck.FlowFeatures` of the generated tokens (plus the prompt's for
        ``token_mask='all'``).

    Example:
        >>> out, feats = capture_generate(extractor, ids, max_new_tokens=8, do_sample=False)  # doctest: +SKIP
    """
    input_ids = extractor._check_ids(input_ids)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_generate_kwargs(extractor.base, generate_kwargs)
    gen_cfg = generate_kwargs.get("generation_config") or getattr(extractor.base, "generation_config", None)
    want_dict = generate_kwargs.pop("return_dict_in_generate", bool(getattr(gen_cfg, "return_dict_in_generate", False)))
    with GenerationCapture(
        extractor, input_ids, attention_mask, _max_new_tokens(extractor.base, generate_kwargs)
    ) as cap:
        out = extractor.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True, **generate_kwargs
        )
        feats = cap.finish(out)
    return (out if want_dict else out.sequences), feats


def attach_scores(result: FlowGenerateOutput, validator: Any, feats: FlowFeatures) -> None:
    """Fill the ``flow_*`` score fields of ``result`` from ``validator.score_features(feats)``."""
    out = validator.score_features(feats)
    result.flow_scores = out.scores
    result.flow_event_scores = out.event_logits
    result.flow_event_mask = feats.valid.to(out.event_logits.device)
    result.flow_token_scores = token_risk(out.token_logits)
    result.flow_positions = feats.positions
    result.flow_culprits = torch.stack([out.culprit_position, out.culprit_block], dim=-1)
    result.flow_has_events = out.has_events


@torch.no_grad()
def flow_generate(
    extractor: FlowExtractor,
    validator: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    scores: bool = True,
    features: bool = False,
    check_every: int | None = None,
    abstain_threshold: float | None = None,
    abstain_ids: list[int] | None = None,
    abstain_eos_id: int | None = None,
    check_refit: str = "always",
    **generate_kwargs: Any,
) -> FlowGenerateOutput:
    """One flow-checked ``generate`` call (what the wrapper's ``generate`` runs once its options are checked).

    Args:
        extractor: The extractor of the generating model.
        validator: Scores features (``score_features``); ``None`` only with ``scores=False`` and no check.
        input_ids: ``[N, P]`` prompts (left padding for batches).
        attention_mask: ``[N, P]``.
        scores: Attach the validator's scores and culprits.
        features: Attach the :class:`~hf_flowcheck.FlowFeatures`.
        check_every: Streaming check every this many tokens (``None``: none).
        abstain_threshold: With ``check_every``: running score above which a row abstains.
        abstain_ids: Token ids of the abstention message.
        abstain_eos_id: Ends an abstaining row (``eos_token_id=`` is a generate setting, passed on).
        check_refit: When a streaming check refits the window bases: ``"always"`` (each running
            score is the spec's score of the answer so far) or ``"doubling"`` (see
            :class:`~hf_flowcheck.extraction.StreamCache`; the final score is exact either way).
        **generate_kwargs: For ``model.generate``.

    Returns:
        A :class:`FlowGenerateOutput` with the prompt's length and attention mask.
    """
    check_generate_kwargs(extractor.base, generate_kwargs)
    generate_kwargs.pop("return_dict_in_generate", None)  # flow outputs are always a FlowGenerateOutput
    prompt_len = input_ids.shape[1]
    streamer = generate_kwargs.get("streamer")
    flow_streamer = streamer if isinstance(streamer, FlowTextStreamer) else None
    if flow_streamer is not None:
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"streamer=FlowTextStreamer streams one answer; input_ids has a batch of {input_ids.shape[0]}. "
                "Stream one prompt per call, or drop streamer= and read flow_running_scores for a batch."
            )
        if validator is None:
            raise ValueError("streamer=FlowTextStreamer needs a validator to score the tokens; load one.")
        check_every = check_every or 1
        flow_streamer.begin_flow(prompt_len)
        stops = StoppingCriteriaList(generate_kwargs.pop("stopping_criteria", None) or [])
        stops.append(_Cancelled(flow_streamer))
        generate_kwargs["stopping_criteria"] = stops
    budget = _max_new_tokens(extractor.base, generate_kwargs)
    capture = GenerationCapture(
        extractor, input_ids, attention_mask, budget, _call_eos(generate_kwargs), refit=check_refit
    )
    stream = None
    if check_every:
        stream = FlowStreamingCheck(
            capture.running_scorer(validator),
            prompt_len,
            int(check_every),
            abstain_threshold,
            abstain_ids,
            abstain_eos_id,
            max_new_tokens=budget,
            listener=(lambda n, r: flow_streamer.on_check(n, r.scores, r.token_risk, r.positions))
            if flow_streamer is not None
            else None,
        )
        procs = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        procs.append(stream)
        generate_kwargs["logits_processor"] = procs
    try:
        with capture:
            out = extractor.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, return_dict_in_generate=True, **generate_kwargs
            )
            feats = capture.finish(out, stream.final_mask if stream is not None else None)
        result = FlowGenerateOutput(
            **{k: v for k, v in out.items()}, prompt_length=prompt_len, prompt_attention_mask=attention_mask
        )
        result.flow_source = extractor.source
        if scores or check_every:
            attach_scores(result, validator, feats)
    except BaseException as err:
        if flow_streamer is not None:
            flow_streamer.close(err)  # a consumer iterating in another thread must not wait forever
        raise
    if flow_streamer is not None:
        flow_streamer.finish(float(result.flow_scores[0]), result.flow_token_scores.cpu(), result.flow_positions.cpu())
    if features:
        result.flow_features = feats
    if stream is not None:
        running, steps, abstained = stream.summary(input_ids.shape[0])
        result.flow_running_scores, result.flow_check_steps, result.flow_abstained = running, steps, abstained
    return result
