"""Flow-guided refinement (spec ``flow-signatures.md`` §7; paper §3.5, A.9, B.11).

A flagged answer is rolled back to its culprit position ``t0`` and regenerated while one block
(``b0``, the culprit block) is patched by a readout-aligned step clamp:

* ``U`` (``[d, k]``) is fitted once from the competitor directions ``w_top - w_y`` of the readout of
  the monitored state ``N_{b0}(r[t0, b0])`` (or raw ``r[t0, b0]`` with ``boundary='residual'``),
  then frozen; ``R = I_k``.
* ``Δp = Uᵀ(h_out - h_in)`` on the block's raw residual input and output.
* ``s_ref`` is the median of ``‖Δp‖`` over the last ``n_cal`` prefix positions before ``t0``.
* For every position ``>= t0``: ``λ = min(1, α·s_ref/(‖Δp‖ + eps))`` and
  ``h_out' = h_out + U(λΔp - Δp)``; the component orthogonal to ``U`` is untouched.

The KV cache that ``generate`` returned is reused: the prefix is never replayed, only the last
``n_cal`` prefix positions (the calibration span) and position ``t0`` are recomputed, in the same
forward call that starts the regeneration. The patch is a plain torch hook pair owned by
:class:`BlockClamp`, removed in ``finally``.

Conventions (documented choices):

* **Left padding.** Each refined row is processed alone with its pad columns removed (the prompt's
  attention mask is taken from ``attention_mask=`` or, if not given, from leading pad tokens); the
  cached keys/values of the kept columns are copied, so positions are unchanged and the user's
  cache is never mutated.
* **Budget.** The original budget ``T`` is ``sequences.shape[1] - prompt_length`` (override with
  ``max_new_tokens=``); the regeneration gets ``T - (t0 + 1 - prompt_length)`` new tokens, so the
  refined answer has at most the original length (§3.5) or stops at end of sequence.
* **Culprit at the last position.** Nothing of the budget is left after it; refinement still
  recomputes ``t0`` under the patch and generates the one token that the culprit state decides
  (budget ``T + 1`` for that row; recorded in :attr:`RefinedRow.max_new_tokens`).
* **Culprit in the prompt** (possible with ``token_mask='all'``), rows with no generated tokens or no
  scored events, and rows with an empty prefix (nothing to calibrate on) are skipped; the reason is
  recorded in :attr:`FlowRefineOutput.skipped`.
* **Which token is drawn again.** Spec §7 keeps the culprit token and regenerates from ``t0 + 1``
  (``rollback="after_culprit"``, the default). ``rollback="culprit"`` rolls back one position further
  and draws the culprit token itself again (the clamp then starts at ``t0 - 1``).
* **Random depth.** ``strategy='random_depth'`` applies the same operator at a block drawn uniformly
  from ``0..B-1`` with a seeded generator; ``U`` and ``s_ref`` are fitted at that block.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from hf_flowcheck.clamp import BasisFn, BlockClamp, ClampStats, hidden_from_args
from hf_flowcheck.errors import NoValidatorError, RefinementError
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.generation import FlowGenerateOutput
from hf_flowcheck.model_io import cache_keyword, output_cache_field, pad_token_id
from hf_flowcheck.refine_config import STRATEGIES, RefineConfig, check_rollback_decoding
from hf_flowcheck.signatures import competitor_directions, fit_basis


# --------------------------------------------------------------------------------- the results
@dataclass
class RefinedRow:
    """One refined answer.

    Token lists hold the prompt without its pad tokens followed by the answer; ``prompt_length``
    counts the prompt part. Positions ``t0`` are columns of the original ``output.sequences``.

    Attributes:
        row: Batch row in the original output.
        strategy: ``"flow"``, ``"random_depth"``, ``"regenerate"`` or ``"resample"``.
        original_ids: Prompt + original answer (up to and including its end-of-sequence token).
        refined_ids: Prompt + answer kept up to ``t0`` + the regenerated suffix.
        prompt_length: Prompt tokens at the start of both lists.
        score_before: The original flow score.
        score_after: The refined answer's flow score (teacher-forced, patch off); ``nan`` if it has
            no scored token or ``rescore=False``.
        culprit_before: ``(t0, b0)`` used, ``t0`` a column of ``output.sequences``: the rollback
            position (the culprit's column, or the one before it with ``rollback="culprit"``).
        culprit_after: ``(t, b)`` of the refined answer's culprit in ``refined_ids`` (``-1`` if none).
        patched_block: The block the clamp was centred on (``None`` for ``"regenerate"`` and ``"resample"``).
        s_ref: Reference step scale (``nan`` without a patch).
        n_cal_used: Calibration positions behind ``s_ref``.
        positions_patched: Positions that went through the clamp.
        positions_clamped: Those with ``λ < 1``.
        mean_lambda: Mean ``λ`` over patched positions.
        max_lambda: Largest ``λ`` (always ``<= 1``).
        max_new_tokens: New-token budget of the regeneration.
        forward_tokens: Token positions the regeneration pushed through the model (prefill + decode).
        original_forward_tokens: Prompt + answer tokens of the original generation of this row.
        cost_ratio: ``forward_tokens / original_forward_tokens``; with the cached prefix this is
            about ``(n_cal + 1 + suffix) / (prompt + T)``.
        wall_time_s: Seconds for the regeneration and re-scoring of this row.
        cache_reused: Whether the original KV cache was reused (``False``: the prefix was replayed).
        note: Why the cache was not reused, or other remarks.
        patched_blocks: Every block clamped (the band around ``patched_block``; empty without a clamp).
        candidates: Rollbacks tried for this row (``num_culprits``); the one kept scored lowest, and
            ``forward_tokens``, ``cost_ratio`` and ``wall_time_s`` add up all of them.
    """

    row: int
    strategy: str
    original_ids: list[int]
    refined_ids: list[int]
    prompt_length: int
    score_before: float
    score_after: float
    culprit_before: tuple[int, int]
    culprit_after: tuple[int, int]
    patched_block: int | None
    s_ref: float
    n_cal_used: int
    positions_patched: int
    positions_clamped: int
    mean_lambda: float
    max_lambda: float
    max_new_tokens: int
    forward_tokens: int
    original_forward_tokens: int
    cost_ratio: float
    wall_time_s: float
    cache_reused: bool
    note: str | None = None
    patched_blocks: tuple[int, ...] = ()
    candidates: int = 1

    @property
    def original_answer_ids(self) -> list[int]:
        return self.original_ids[self.prompt_length :]

    @property
    def refined_answer_ids(self) -> list[int]:
        return self.refined_ids[self.prompt_length :]


@dataclass
class FlowRefineOutput(ModelOutput):
    """What :func:`refine` returns: the whole batch, shaped like the generate output it refines.

    Attributes:
        sequences: ``[batch, P + A]`` every row of the batch: the original prompt columns (its left
            padding kept), then the answer: refined rows' new answers, other rows' originals, right-padded
            with the pad id as ``generate`` pads finished rows.
        flow_scores: ``[batch]`` scores after refinement (refined rows re-scored teacher-forced with the
            patch removed; other rows unchanged).
        flow_scores_before: ``[batch]`` the output's scores.
        refined: ``[batch]`` bool, rows that were refined.
        prompt_length: ``P``, as in the generate output.
        rows: One :class:`RefinedRow` per refined row, in row order (culprit, clamp statistics, cost).
        skipped: ``{row: reason}`` for selected rows that could not be refined.
        strategy: The strategy used for every row.
    """

    sequences: torch.LongTensor | None = None
    flow_scores: torch.FloatTensor | None = None
    flow_scores_before: torch.FloatTensor | None = None
    refined: torch.BoolTensor | None = None
    prompt_length: int | None = None
    rows: list[RefinedRow] | None = None
    skipped: dict[int, str] | None = None
    strategy: str | None = None

    @property
    def row_indices(self) -> list[int]:
        """Batch rows that were refined, ascending."""
        return [r.row for r in self.rows or []]

    @property
    def scores_before(self) -> torch.Tensor:
        """``[n_refined]`` float, the refined rows' scores before."""
        return torch.tensor([r.score_before for r in self.rows or []], dtype=torch.float32)

    @property
    def scores_after(self) -> torch.Tensor:
        """``[n_refined]`` float, the refined rows' scores after."""
        return torch.tensor([r.score_after for r in self.rows or []], dtype=torch.float32)

    def refined_sequences(self, pad_token_id: int = 0) -> torch.Tensor:
        """``[n_refined, S]`` long, only the refined rows' token lists, left-padded with ``pad_token_id``."""
        rows = self.rows or []
        width = max((len(r.refined_ids) for r in rows), default=0)
        out = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            if r.refined_ids:
                out[i, width - len(r.refined_ids) :] = torch.tensor(r.refined_ids)
        return out


def _batch_output(
    output: Any, rows: list[RefinedRow], skipped: dict[int, str], strategy: str, pad: int
) -> FlowRefineOutput:
    """The whole batch with refined rows' answers replaced (prompt columns untouched)."""
    seqs = output.sequences
    prompt_len = int(output.prompt_length)
    by_row = {r.row: r for r in rows}
    answers = [
        by_row[i].refined_answer_ids if i in by_row else seqs[i, prompt_len:].tolist() for i in range(seqs.shape[0])
    ]
    width = max((len(a) for a in answers), default=0)
    tail = torch.full((seqs.shape[0], width), pad, dtype=seqs.dtype, device=seqs.device)
    for i, a in enumerate(answers):
        if a:
            tail[i, : len(a)] = torch.tensor(a, dtype=seqs.dtype, device=seqs.device)
    before = output.flow_scores.detach().float().cpu()
    after = before.clone()
    refined = torch.zeros(seqs.shape[0], dtype=torch.bool)
    for r in rows:
        after[r.row] = r.score_after
        refined[r.row] = True
    return FlowRefineOutput(
        sequences=torch.cat([seqs[:, :prompt_len], tail], dim=1),
        flow_scores=after,
        flow_scores_before=before,
        refined=refined,
        prompt_length=prompt_len,
        rows=rows,
        skipped=skipped,
        strategy=strategy,
    )


# ---------------------------------------------------------------------------------- internals
@contextmanager
def _count_tokens(block: nn.Module) -> Iterator[list[int]]:
    """Counts ``batch * S`` token positions entering ``block`` (hook removed in ``finally``)."""
    count = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = hidden_from_args(args, kwargs)
        count[0] += int(h.shape[0]) * int(h.shape[-2]) if h.dim() >= 3 else int(h.shape[-2])

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield count
    finally:
        handle.remove()


def _prompt_mask(pad: int | None, prompt: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[batch, P]`` bool: real (non-pad) prompt columns."""
    if attention_mask is not None:
        if attention_mask.shape != prompt.shape:
            raise RefinementError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the prompt part of "
                f"output.sequences is {tuple(prompt.shape)}; pass the mask given to generate()."
            )
        return attention_mask.to(prompt.device).bool()
    if pad is None:
        return torch.ones_like(prompt, dtype=torch.bool)
    # Only *leading* pad tokens are padding (left padding); a pad id inside the prompt is kept.
    return torch.cumsum((prompt != pad).long(), dim=-1) > 0


def _answer_end(ext: FlowExtractor, answer: torch.Tensor) -> int:
    """Length of a row's answer up to and including its first end-of-sequence token."""
    eos = ext.eos_ids
    if eos:
        hits = torch.isin(answer, torch.tensor(sorted(eos), device=answer.device)).nonzero()
        if hits.numel():
            return int(hits[0]) + 1
    return int(answer.numel())


def _usable_cache(cache: Any, need: int) -> str | None:
    """``None`` if the first ``need`` columns of every layer can be copied out, else the reason."""
    from transformers import DynamicCache

    if cache is None:
        return "the output has no past_key_values (generate was called with use_cache=False)"
    if not isinstance(cache, DynamicCache):
        return f"{type(cache).__name__} is not a DynamicCache; its columns cannot be copied out"
    for i, layer in enumerate(cache.layers):
        keys = getattr(layer, "keys", None)
        if keys is None or not getattr(layer, "is_initialized", True):
            return f"layer {i} of the cache is empty"
        stored, total = keys.shape[-2], layer.get_seq_length()
        if stored != total:
            return f"layer {i} is a sliding-window layer that already dropped early positions"
        if stored < need:
            return f"the cache holds {stored} positions, fewer than the {need} needed"
    return None


def _row_cache(cache: Any, row: int, cols: torch.Tensor, config: Any) -> Any:
    """A new ``DynamicCache`` with the keys/values of ``row`` at sequence columns ``cols`` (copies)."""
    from transformers import DynamicCache

    data = []
    for layer in cache.layers:
        c = cols.to(layer.keys.device)
        data.append(
            (
                layer.keys[row : row + 1].index_select(-2, c).clone(),
                layer.values[row : row + 1].index_select(-2, c).clone(),
            )
        )
    return DynamicCache(ddp_cache_data=data, config=config)


def _basis_fn(ext: FlowExtractor, block: int, num_competitors: int, subspace_dim: int) -> BasisFn:
    norms = ext.norms  # float32 copies of N_0..N_B (also prepares the float32 readout)
    readout = ext.readout
    boundary = ext.config.boundary

    def fit(h_in: torch.Tensor) -> torch.Tensor:
        x = h_in.float().to(readout.device)[None]
        state = norms[block](x).float() if boundary == "normalized" else x
        logits = state @ readout.T  # [1, V]
        dirs = competitor_directions(logits, readout, num_competitors)
        return fit_basis(dirs, readout.shape[1], subspace_dim)

    return fit


def _check_args(ext: FlowExtractor, validator: Any, output: Any, config: RefineConfig) -> None:
    vocab, dim = ext.arch.readout.shape
    if config.subspace_dim > dim:
        raise ValueError(f"subspace_dim={config.subspace_dim} exceeds the hidden size {dim}; use subspace_dim<={dim}.")
    if config.num_competitors >= vocab:
        raise ValueError(f"num_competitors={config.num_competitors} must be smaller than the vocabulary ({vocab}).")
    if validator is None:
        raise NoValidatorError("refine() re-scores the refined answers and needs a validator; pass validator=....")
    missing = [
        name
        for name in ("sequences", "flow_scores", "flow_culprits", "flow_has_events", "prompt_length")
        if getattr(output, name, None) is None
    ]
    if missing:
        raise RefinementError(
            f"The output has no {', '.join(missing)}: refine() needs the culprits of a flow-checked "
            "generation. Call model.generate(..., return_flow_scores=True) and pass its result."
        )


def _select_rows(output: Any, rows: Sequence[int] | None, threshold: float) -> list[int]:
    n = output.sequences.shape[0]
    if rows is None:
        scores = output.flow_scores.detach().float().cpu()
        has = output.flow_has_events.detach().bool().cpu()
        return [i for i in range(n) if bool(has[i]) and float(scores[i]) > threshold]
    picked = []
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, int) or not -n <= r < n:
            raise ValueError(f"rows contains {r!r}; the output has {n} rows (0..{n - 1}).")
        picked.append(r % n)
    return sorted(set(picked))


# --------------------------------------------------------------------------------------- refine
@torch.no_grad()
def refine(
    model: nn.Module,
    extractor: FlowExtractor,
    validator: Any,
    output: FlowGenerateOutput,
    config: RefineConfig | None = None,
    *,
    rows: Sequence[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> FlowRefineOutput:
    """Roll flagged answers back to their culprit and regenerate them under the block clamp.

    Each selected row is processed alone (no batching): its cached prefix is copied from
    ``output.past_key_values`` (the user's cache is not changed), block ``b0`` is patched with a
    :class:`BlockClamp` for the regeneration only, and the refined answer is re-scored
    teacher-forced with the validator after the patch is removed.

    Args:
        model: The causal LM that produced ``output`` (it generates the refined suffixes).
        extractor: Its :class:`~hf_flowcheck.FlowExtractor` (architecture, readout, end ids).
        validator: Re-scores refined answers (``score_features``).
        output: From a flow-checked ``generate(..., return_flow_scores=True)``; uses ``sequences``
            ``[batch, S]``, ``flow_scores`` ``[batch]``, ``flow_culprits`` ``[batch, 2]``,
            ``flow_has_events`` ``[batch]``, ``prompt_length``, ``prompt_attention_mask`` and
            ``past_key_values``.
        config: A :class:`RefineConfig` (default ``RefineConfig()``).
        rows: Refine exactly these rows instead of those scoring above ``config.threshold``.
        attention_mask: ``[batch, P]`` prompt mask (default: ``output.prompt_attention_mask``, else
            leading pad tokens are padding).
        tokenizer: Asked for the pad id when the model's configs have none.
        **generate_kwargs: Decoding settings for ``generate`` (``do_sample``, ``temperature``,
            ``logits_processor``, ``generation_config``...). Default: greedy. ``max_new_tokens``, if
            given, is taken as the original budget ``T``.

    Returns:
        A :class:`FlowRefineOutput` with every row of the batch.

    Raises:
        RefinementError: If ``output`` lacks flow scores or culprits.
        ValueError: For a bad parameter or row index.

    Example:
        >>> out = model.generate(**inputs, max_new_tokens=64, return_flow_scores=True)  # doctest: +SKIP
        >>> res = refine(model.base_model, model.extractor, model.validator, out)  # doctest: +SKIP
        >>> res.sequences.shape[0] == out.sequences.shape[0]  # doctest: +SKIP
        True
    """
    config = config or RefineConfig()
    if not isinstance(config, RefineConfig):
        raise TypeError(f"config must be a RefineConfig, got {type(config).__name__}.")
    _check_args(extractor, validator, output, config)
    seqs = output.sequences
    prompt_len = int(output.prompt_length)
    budget = generate_kwargs.pop("max_new_tokens", None)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"max_new_tokens={budget!r} must be a positive integer (the refined answer's token budget).")
    generate_kwargs.pop("max_length", None)
    for name in (
        "return_flow_scores",
        "return_flow_features",
        "flow_check_every",
        "flow_check_refit",
        "flow_abstain_threshold",
    ):
        if generate_kwargs.pop(name, None):
            raise ValueError(f"{name} is not supported inside refine(); the refined answer is re-scored already.")
    for name in ("input_ids", "inputs", "past_key_values", "inputs_embeds"):
        if name in generate_kwargs:
            raise ValueError(f"{name} cannot be given to refine(); the prefix and its cache come from `output`.")
    check_rollback_decoding(generate_kwargs)
    source = getattr(output, "flow_source", None)
    if source is not None:  # its KV cache and culprits are another model's otherwise
        source.check_model(extractor.source.fingerprint, "This output")
    budget = int(budget) if budget is not None else seqs.shape[1] - prompt_len
    if "generation_config" not in generate_kwargs and "do_sample" not in generate_kwargs:
        generate_kwargs["do_sample"] = False
    generate_kwargs.pop("return_dict_in_generate", None)
    if attention_mask is None:
        attention_mask = getattr(output, "prompt_attention_mask", None)
    real = _prompt_mask(pad_token_id(model, tokenizer), seqs[:, :prompt_len], attention_mask)
    with extractor.arch.lock:  # the clamp's hooks sit on shared modules (architectures.model_lock)
        done, skipped = _refine_rows(
            model, extractor, validator, output, config, rows, real, prompt_len, budget, generate_kwargs
        )
    pad = pad_token_id(model, tokenizer, eos_fallback=True)
    return _batch_output(output, done, skipped, config.strategy, 0 if pad is None else pad)


def _refine_rows(
    model: nn.Module,
    extractor: FlowExtractor,
    validator: Any,
    output: FlowGenerateOutput,
    config: RefineConfig,
    rows: Sequence[int] | None,
    real: torch.Tensor,
    prompt_len: int,
    budget: int,
    generate_kwargs: dict[str, Any],
) -> tuple[list[RefinedRow], dict[int, str]]:
    gen = torch.Generator().manual_seed(0 if config.seed is None else int(config.seed))
    n_blocks = extractor.arch.num_blocks
    done: list[RefinedRow] = []
    skipped: dict[int, str] = {}
    for row in _select_rows(output, rows, config.threshold):
        # Draw for every selected row (also skipped ones) so a row's blocks do not depend on others.
        drawn = torch.randint(n_blocks, (config.num_culprits,), generator=gen).tolist()
        reason = _skip_reason(output, row, prompt_len, real[row], n_blocks, config)
        if reason is not None:
            skipped[row] = reason
            continue
        tried = []
        positions = getattr(output, "flow_positions", None)
        words = None
        if positions is not None:
            seq = output.sequences[row].detach().cpu()
            words = extractor.word_tokens(seq[positions[row].detach().cpu().clamp(0, seq.shape[0] - 1)])
        for i, (t0, b0) in enumerate(_candidates(output, row, prompt_len, config, words)):
            if config.rollback == "culprit" and config.strategy != "resample":
                t0 -= 1  # the state that decided the culprit token
            center = {"flow": b0, "random_depth": drawn[i]}.get(config.strategy)
            if config.seed is not None:
                torch.manual_seed(int(config.seed) + i)
            job = _RowJob(row=row, t0=t0, b0=b0, center=center, real=real[row], budget=budget)
            tried.append(_refine_row(model, extractor, validator, output, job, config, dict(generate_kwargs)))
        done.append(_best_candidate(tried))
    return done, skipped


@dataclass
class _RowJob:
    """One candidate of a selected row: rollback position, the block to clamp around, prompt columns, budget."""

    row: int
    t0: int
    b0: int
    center: int | None
    real: torch.Tensor
    budget: int


def _candidates(
    output: Any, row: int, prompt_len: int, config: RefineConfig, words: torch.Tensor | None = None
) -> list[tuple[int, int]]:
    """``(t0, b0)`` of the ``num_culprits`` rollbacks to try for one row.

    ``"resample"`` rolls back to the last prompt token (the whole answer is drawn again). Otherwise
    the culprit comes first, then the next riskiest answer tokens (``flow_token_scores``; outputs
    without them, by their highest event logit), each at the block of its highest event logit, as
    the culprit is (one candidate per token). ``words`` (``[T]`` bool, the columns whose token has a
    word character) keeps punctuation out, as the culprit rule does, unless no answer token has one.
    """
    if config.strategy == "resample":
        return [(prompt_len - 1, -1)] * config.num_culprits
    first = (tuple(int(v) for v in output.flow_culprits[row].tolist()),)
    scores = getattr(output, "flow_event_scores", None)
    positions = getattr(output, "flow_positions", None)
    if config.num_culprits == 1 or scores is None or positions is None:
        return list(first)
    ev = scores[row].detach().float().cpu()  # [B, T], -inf where there is no event
    best, block = ev.max(dim=0)  # per token
    risk = getattr(output, "flow_token_scores", None)
    rank = best if risk is None else risk[row].detach().float().cpu()
    pos = positions[row].cpu()
    ok = (pos >= prompt_len) & torch.isfinite(best) & ~torch.isnan(rank)
    if words is not None and bool((ok & words).any()):
        ok = ok & words
    order = torch.argsort(-rank.masked_fill(~ok, -float("inf")), stable=True)
    out = list(first)
    for j in order.tolist():
        if len(out) >= config.num_culprits or not bool(ok[j]):
            break
        cand = (int(pos[j]), int(block[j]))
        if cand[0] not in {t for t, _ in out}:
            out.append(cand)
    return out


def _best_candidate(tried: list[RefinedRow]) -> RefinedRow:
    """The candidate with the lowest score after (unscored ones last), with the costs of all summed."""
    best = min(tried, key=lambda r: r.score_after if r.score_after == r.score_after else float("inf"))
    if len(tried) == 1:
        return best
    return dataclasses.replace(
        best,
        candidates=len(tried),
        forward_tokens=sum(r.forward_tokens for r in tried),
        cost_ratio=sum(r.cost_ratio for r in tried),
        wall_time_s=sum(r.wall_time_s for r in tried),
    )


def _skip_reason(
    output: Any, row: int, prompt_len: int, real: torch.Tensor, n_blocks: int, config: RefineConfig
) -> str | None:
    seqs = output.sequences
    if seqs.shape[1] <= prompt_len:
        return "the output has no generated tokens"
    if config.strategy == "resample":
        return None if int(real.sum()) >= 1 else "the prompt is all padding: nothing to generate from"
    if not bool(output.flow_has_events[row]):
        return "the row has no scored token (empty answer or only special tokens), so no culprit"
    t0, b0 = (int(v) for v in output.flow_culprits[row].tolist())
    if t0 < 0 or b0 < 0:
        return "the row has no culprit"
    if t0 < prompt_len:
        return (
            f"the culprit t0={t0} lies in the prompt (prompt_length={prompt_len}); refinement only rewrites the "
            "answer, so there is nothing to roll back to"
        )
    if t0 >= seqs.shape[1]:
        return f"the culprit t0={t0} lies beyond the sequence ({seqs.shape[1]} columns)"
    if b0 >= n_blocks:
        return f"the culprit block b0={b0} does not exist (the model has {n_blocks} blocks); the output was altered"
    shift = 1 if config.rollback == "culprit" else 0  # the rollback position is t0 - shift
    if int(real.sum()) + (t0 - shift - prompt_len) < 1:
        return "the prefix before the rollback position is empty (the prompt is all padding): nothing to calibrate on"
    return None


def _refine_row(
    model: nn.Module,
    ext: FlowExtractor,
    validator: Any,
    output: Any,
    job: _RowJob,
    config: RefineConfig,
    generate_kwargs: dict[str, Any],
) -> RefinedRow:
    row, t0, b0, center, real, budget = job.row, job.t0, job.b0, job.center, job.real, job.budget
    strategy, alpha, n_cal = config.strategy, config.alpha, config.n_cal
    started = time.perf_counter()
    seqs = output.sequences
    prompt_len = int(output.prompt_length)
    device = ext.device
    real_cols = real.nonzero().squeeze(-1).to(seqs.device)
    p_real = int(real_cols.numel())
    # Columns of this row without its pads, in sequence order: real prompt columns, then the answer.
    cols = torch.cat([real_cols, torch.arange(prompt_len, seqs.shape[1], device=seqs.device)])
    ids = seqs[row, cols]
    answer = seqs[row, prompt_len:]
    ans_len = _answer_end(ext, answer)
    original = ids[: p_real + ans_len].tolist()
    t0_row = p_real + (t0 - prompt_len)  # t0 in the pad-free row
    prefix = ids[: t0_row + 1]
    max_new = budget - (t0 + 1 - prompt_len)
    note = None
    if max_new < 1:
        max_new = 1
        note = "the culprit is the last position of the budget: one token past the budget was generated"

    # Which positions the first forward call must cover: t0, plus the calibration span with a patch.
    n_blocks = ext.arch.num_blocks
    patched = (
        () if center is None else tuple(range(max(0, center - config.band), min(n_blocks, center + config.band + 1)))
    )
    cal_start = max(0, t0_row - n_cal) if patched else t0_row
    cache = None
    start = 0
    cache_reused = False
    if config.use_cache_prefix:
        given = getattr(output, output_cache_field(output), None)
        why = _usable_cache(given, int(cols[cal_start - 1]) + 1 if cal_start else 0)
        if why is None:
            start = cal_start
            if cal_start > 0:
                model_config = getattr(ext.base, "config", None)
                cache = _row_cache(given, row, cols[:cal_start], model_config)
                cache_reused = True
        else:
            note = f"prefix replayed: {why}" + (f"; {note}" if note else "")
        if why is None and cal_start == 0:
            whole = "the calibration span covers the whole prefix: nothing cached to reuse"
            note = whole + (f"; {note}" if note else "")
    stop = None if config.clamp_positions is None else t0_row + config.clamp_positions
    clamps = [
        BlockClamp(
            ext.arch.blocks[b],
            t0_row,
            alpha=alpha,
            start=start,
            calibration_start=cal_start,
            basis_fn=_basis_fn(ext, b, config.num_competitors, config.subspace_dim),
            stop=stop,
        )
        for b in patched
    ]
    kwargs = dict(generate_kwargs)
    kwargs.update(
        input_ids=prefix[None].to(device),
        attention_mask=torch.ones(1, prefix.numel(), dtype=torch.long, device=device),
        max_new_tokens=max_new,
        return_dict_in_generate=True,
    )
    if cache is not None:
        kwargs[cache_keyword(model)] = cache
    with _count_tokens(ext.arch.blocks[0]) as count, ExitStack() as stack:
        for clamp in clamps:
            stack.enter_context(clamp)
        out = model.generate(**kwargs)
    new_seq = out.sequences[0].to(seqs.device)
    new_answer = new_seq[p_real:]
    refined = new_seq[: p_real + _answer_end(ext, new_answer)].tolist()

    score_after, culprit_after = float("nan"), (-1, -1)
    if config.rescore:  # teacher-forced, with the patch removed
        r_ids = torch.tensor([refined], dtype=torch.long)
        resp = torch.zeros_like(r_ids)
        resp[:, p_real:] = 1
        feats = ext.extract(r_ids.to(device), torch.ones_like(r_ids).to(device), resp.to(device))
        scored = validator.score_features(feats)
        if bool(scored.has_events[0]):
            score_after = float(scored.scores[0])
            culprit_after = (int(scored.culprit_position[0]), int(scored.culprit_block[0]))
    stats = _merged_stats([c.stats for c in clamps], patched.index(center) if patched else 0)
    orig_tokens = len(original)
    return RefinedRow(
        row=row,
        strategy=strategy,
        original_ids=original,
        refined_ids=refined,
        prompt_length=p_real,
        score_before=float(output.flow_scores[row]),
        score_after=score_after,
        culprit_before=(t0, b0),
        culprit_after=culprit_after,
        patched_block=center,
        s_ref=stats.s_ref,
        n_cal_used=stats.n_cal_used,
        positions_patched=stats.positions_patched,
        positions_clamped=stats.positions_clamped,
        mean_lambda=stats.mean_lambda,
        max_lambda=stats.max_lambda,
        max_new_tokens=max_new,
        forward_tokens=count[0],
        original_forward_tokens=orig_tokens,
        cost_ratio=count[0] / max(1, orig_tokens),
        wall_time_s=time.perf_counter() - started,
        cache_reused=cache_reused,
        note=note,
        patched_blocks=patched,
    )


def _merged_stats(stats: list[ClampStats], center: int) -> ClampStats:
    """One row's clamp statistics over its band: counts and λ of all clamps, ``s_ref`` of the center block's."""
    if not stats:
        return ClampStats()
    return ClampStats(
        s_ref=stats[center].s_ref,
        n_cal_used=stats[center].n_cal_used,
        positions_patched=sum(s.positions_patched for s in stats),
        positions_clamped=sum(s.positions_clamped for s in stats),
        lambdas=[v for s in stats for v in s.lambdas],
    )


__all__ = [
    "STRATEGIES",
    "FlowRefineOutput",
    "RefineConfig",
    "RefinedRow",
    "check_rollback_decoding",
    "refine",
]
