"""What the flow validator returns, and the pure pooling of event logits into tokens and culprits."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "FlowValidatorOutput",
    "culprit_cells",
    "mean_present",
    "riskiest_token_cells",
    "token_pool_attention",
    "token_pool_max",
    "word_token_cells",
]


@dataclass
class FlowValidatorOutput:
    """What the validator returns for ``N`` samples.

    Attributes:
        logits: ``[N]`` pooled sample logits; ``nan`` for rows without any valid event.
        scores: ``[N]`` ``sigmoid(logits)`` in ``[0, 1]``, higher = more likely hallucinated;
            ``nan`` for rows without events.
        event_logits: ``[N, B, T]`` per-event logits, ``-inf`` where the cell is not a valid event.
        culprit_block: ``[N]`` long, block ``b0`` of the culprit: the block of the culprit token's
            largest event logit (-1 without events).
        culprit_column: ``[N]`` long, column ``t`` (index into ``T``) of the culprit: the riskiest
            token, i.e. the largest ``token_logits`` (-1 without events). Until session 18 it was the
            column of the answer's largest event logit (``benchmarks/culprit_quality.py`` compares
            the two). :meth:`FlowValidator.score_features` moves it off a token without a word
            character when the features say which tokens have one (:func:`word_token_cells`).
        has_events: ``[N]`` bool, whether the row has at least one valid event.
        token_logits: ``[N, T]`` each token's logit: the validator's pooling applied to that token's
            events alone (plus the state term), i.e. the answer's logit if all of its flow evidence
            were this token's; ``nan`` for a column without events. With the attention head the
            answer's logit is their ``token_weights``-weighted mean; with the GRU head and max
            (log-sum-exp) pooling it is their maximum (log-sum-exp, state term counted once).
        token_weights: ``[N, T]`` each token's share of the pooling (attention mass of its events; for
            max pooling 1 at the arg-max token), summing to 1 over a row with events.
        culprit_position: ``[N]`` long, sequence position ``t0`` of the culprit (from
            ``FlowFeatures.positions``; -1 without events). Set by :meth:`FlowValidator.score_features` only.
    """

    logits: torch.Tensor
    scores: torch.Tensor
    event_logits: torch.Tensor
    culprit_block: torch.Tensor
    culprit_column: torch.Tensor
    has_events: torch.Tensor
    token_logits: torch.Tensor
    token_weights: torch.Tensor
    culprit_position: torch.Tensor | None = None


def token_pool_attention(event_logits: torch.Tensor, attend: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention pooling restricted to each token's events.

    Args:
        event_logits: ``[N, B, T]`` (``-inf`` where no event).
        attend: ``[N, B, T]`` attention logits (``-inf`` where no event).

    Returns:
        ``(token_logits, token_weights)``, each ``[N, T]``: the within-token attention average of the
        event logits (``nan`` without events) and the token's share of the answer's attention.
    """
    has = torch.isfinite(event_logits)
    tok_lse = torch.logsumexp(attend, dim=1)  # [N, T], -inf for a token without events
    within = torch.exp(attend - tok_lse[:, None].masked_fill(~torch.isfinite(tok_lse[:, None]), 0.0))
    within = within.masked_fill(~has, 0.0)
    logits = (within * event_logits.masked_fill(~has, 0.0)).sum(1)
    logits = torch.where(has.any(1), logits, torch.full_like(logits, float("nan")))
    weights = torch.softmax(tok_lse, dim=1)  # a row without events gives nan
    return logits, torch.nan_to_num(weights, nan=0.0)


def mean_present(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last dim of the non-``nan`` entries; ``nan`` where there are none.

    ``torch.nanmean`` would also do in the forward pass, but its backward through an all-``nan`` row
    divides by zero; here such rows get zero gradient.
    """
    present = ~torch.isnan(x)
    count = present.sum(-1)
    mean = x.nan_to_num(0.0).sum(-1) / count.clamp_min(1).to(x.dtype)
    return torch.where(count > 0, mean, torch.full_like(mean, float("nan")))


def culprit_cells(flat: torch.Tensor, has: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, column)`` of each row's culprit from its flat ``b*T + t`` cell; ``-1`` for rows without events."""
    minus = torch.full_like(flat, -1)
    return torch.where(has, torch.div(flat, t, rounding_mode="floor"), minus), torch.where(has, flat % t, minus)


def token_pool_max(event_logits: torch.Tensor, pooling: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Max (or log-sum-exp) pooling restricted to each token's events; see :func:`token_pool_attention`."""
    has = event_logits.isfinite().any(1)  # [N, T]
    if pooling == "max":
        logits = event_logits.max(dim=1).values
        weights = torch.zeros_like(logits)
        if logits.shape[1] > 0:
            weights.scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    else:
        logits = torch.logsumexp(event_logits, dim=1)
        weights = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0)
    weights = weights * has.any(1, keepdim=True)
    return torch.where(has, logits, torch.full_like(logits, float("nan"))), weights


def riskiest_token_cells(
    token_logits: torch.Tensor, event_logits: torch.Tensor, has: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, column)`` of each row's culprit: the riskiest token, at its largest event.

    Args:
        token_logits: ``[N, T]`` (``nan`` for a column without events).
        event_logits: ``[N, B, T]`` (``-inf`` where no event).
        has: ``[N]`` bool, whether the row has any event.

    Returns:
        ``(culprit_block, culprit_column)``, each ``[N]`` long; ``-1`` for rows without events.
    """
    n, b, t = event_logits.shape
    minus = torch.full((n,), -1, dtype=torch.long, device=event_logits.device)
    if t == 0:
        return minus, minus.clone()
    col = token_logits.masked_fill(torch.isnan(token_logits), float("-inf")).argmax(1)
    block = event_logits.gather(2, col[:, None, None].expand(n, b, 1)).squeeze(2).argmax(1)
    return torch.where(has, block, minus), torch.where(has, col, minus)


def word_token_cells(out: FlowValidatorOutput, word_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block, column)`` of each row's culprit, moved off a token without a word character.

    A culprit on punctuation gives a rollback nothing to change (on Qwen2.5-Coder-0.5B the riskiest
    token was punctuation in 39% of hallucinated answers; ``benchmarks/culprit_quality.py``). A row
    whose culprit is such a token takes its riskiest word token instead, at that token's largest
    event; a row with no scored word token keeps its culprit.

    Args:
        out: The validator's output (``token_logits [N, T]``, ``event_logits [N, B, T]``).
        word_tokens: ``[N, T]`` bool, the columns that may be the culprit.

    Returns:
        ``(culprit_block, culprit_column)``, each ``[N]`` long.
    """
    if out.event_logits.shape[2] == 0:
        return out.culprit_block, out.culprit_column
    word = word_tokens.to(out.token_logits.device).bool()
    risk = out.token_logits.masked_fill(torch.isnan(out.token_logits) | ~word, float("-inf"))
    has_word = torch.isfinite(risk).any(1)
    on_word = word.gather(1, out.culprit_column.clamp_min(0)[:, None]).squeeze(1)
    block, col = riskiest_token_cells(risk, out.event_logits, out.has_events & has_word)
    move = out.has_events & has_word & ~on_word
    return torch.where(move, block, out.culprit_block), torch.where(move, col, out.culprit_column)
