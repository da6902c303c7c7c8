"""Vocabulary-wide readouts of residual states through ``W`` (no hooks, no I/O).

The competitor ranking of the window fits, the readout-lens channels and the token-confidence
channel all read states out over the whole vocabulary. They live here, with the order that ranks
tokens (value descending, ties to the smaller id) and the vocabulary blocks that keep the transient
of a readout small. Shapes: ``P`` rows read out, ``R`` tokens, ``B`` blocks, ``d`` hidden size,
``V`` vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "READOUT_BLOCK_ELEMENTS",
    "READOUT_BLOCK_MIN_WIDTH",
    "TOKEN_CONFIDENCE_NAMES",
    "candidate_rows",
    "lens_features",
    "rank_top",
    "readout_top",
    "token_confidence_rows",
    "token_confidence_summary",
    "vocabulary_blocks",
]

NormFn = Callable[[torch.Tensor], torch.Tensor]

#: Most float32 logits one vocabulary-wide readout holds at a time (4 MiB). Readouts are taken in
#: blocks of vocabulary columns, not of rows: every row meets each block of ``W`` once, so ``W`` is
#: still streamed from memory once per readout while the transient stays near the capture bound
#: (a ``[224, 49,152]`` product was 44 MB against a 6.5 MB bound at 32 tokens).
READOUT_BLOCK_ELEMENTS = 2**20
#: Narrowest vocabulary block, so that many rows still get matrix products wide enough to be efficient.
READOUT_BLOCK_MIN_WIDTH = 1024


# ------------------------------------------------------------------------------------ ranking
def rank_top(logits: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest logits per row, descending, ties broken by the smaller token id.

    Args:
        logits: ``[P, V]``.
        n: How many to return (``<= V``).

    Returns:
        ``[P, n]`` long.
    """
    # Ties at the cut-off could admit a larger id than a tied one that topk left out: fall back to a
    # full stable sort for those rows only. A tie at the cut is the (n+1)-th value equalling the n-th,
    # so one extra column of topk finds it without a [P, V] mask.
    vals, idx = torch.topk(logits, min(n + 1, logits.shape[-1]), dim=-1)
    at_cut = (
        vals[:, n] >= vals[:, n - 1] if 0 < n < logits.shape[-1] else torch.zeros_like(vals[:, 0], dtype=torch.bool)
    )
    vals, idx = vals[:, :n], idx[:, :n]
    order = torch.argsort(idx, dim=-1)
    vals, idx = vals.gather(-1, order), idx.gather(-1, order)
    order = torch.argsort(-vals, dim=-1, stable=True)
    idx = idx.gather(-1, order)
    if bool(at_cut.any()):
        rows = at_cut.nonzero().squeeze(-1)
        full = torch.argsort(-logits[rows], dim=-1, stable=True)[:, :n]
        idx[rows] = full
    return idx


def vocabulary_blocks(vocab: int, rows: int) -> list[slice]:
    """Column blocks of a ``[rows, vocab]`` readout of at most :data:`READOUT_BLOCK_ELEMENTS` values each
    (never narrower than :data:`READOUT_BLOCK_MIN_WIDTH`)."""
    width = max(READOUT_BLOCK_MIN_WIDTH, READOUT_BLOCK_ELEMENTS // max(rows, 1))
    return [slice(v0, min(v0 + width, vocab)) for v0 in range(0, vocab, width)]


def readout_top(states: torch.Tensor, readout: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`rank_top` of ``states @ readout.T`` without the whole ``[P, V]`` product.

    The vocabulary is read in :func:`vocabulary_blocks`; each block's top ``n`` (same order: value
    descending, ties to the smaller id) is merged into the running top ``n``. The order is total,
    so the merged result is the whole product's top ``n``.

    Args:
        states: ``[P, d]``.
        readout: ``W``, ``[V, d]`` (float32 logits are computed in its dtype, then cast).
        n: How many ids per row (``<= V``).

    Returns:
        ``[P, n]`` long token ids.
    """
    states = states.to(readout.dtype)
    best_vals: torch.Tensor | None = None
    best_ids = torch.zeros(states.shape[0], 0, dtype=torch.long, device=states.device)
    for cols in vocabulary_blocks(readout.shape[0], states.shape[0]):
        logits = (states @ readout[cols].T).float()  # [P, width]
        local = rank_top(logits, min(n, logits.shape[1]))
        vals, ids = logits.gather(-1, local), local + cols.start
        if best_vals is not None:
            vals, ids = torch.cat([best_vals, vals], -1), torch.cat([best_ids, ids], -1)
            # (value descending, id ascending): a stable sort by value after one by id.
            order = torch.argsort(ids, dim=-1)
            vals, ids = vals.gather(-1, order), ids.gather(-1, order)
            order = torch.argsort(-vals, dim=-1, stable=True)[:, :n]
            vals, ids = vals.gather(-1, order), ids.gather(-1, order)
        best_vals, best_ids = vals, ids
    return best_ids


def candidate_rows(last: torch.Tensor, readout: torch.Tensor, per_token: int) -> torch.Tensor:
    """A sample's competitor candidates (``FlowConfig.competitor_candidates``): the union of each
    token's top ``per_token`` rows of the last block's readout.

    Args:
        last: ``[R, d]`` the monitored states after the last block.
        readout: ``W``, ``[V, d]``.
        per_token: ``C``, candidates per token.

    Returns:
        ``[U]`` long, ascending token ids, ``min(C, V) <= U <= min(R * C, V)`` (all ``V`` when ``R = 0``).
    """
    if last.shape[0] == 0 or per_token >= readout.shape[0]:
        return torch.arange(readout.shape[0], device=readout.device)
    top = (last.to(readout.dtype) @ readout.T).topk(per_token, dim=-1).indices  # [R, C]
    return torch.unique(top)  # sorted


# -------------------------------------------------------------------------------------- lens
def lens_features(
    r_after: torch.Tensor, final_norm: NormFn, readout: torch.Tensor, top_k: int, candidates: int = 0
) -> torch.Tensor:
    """Readout-lens features of each (token, block): the residual after block ``b`` read out as if final.

    Each token's features depend on that token's states only (a streaming caller may cache them).

    Args:
        r_after: ``[R, B, d]`` residual states after each block (``r_{b+1}``).
        final_norm: ``N_B``, the norm before the readout.
        readout: ``W``, ``[V, d]``.
        top_k: Competitors in the entropy (``K``).
        candidates: 0: read out the whole vocabulary (exact). ``C > 0``: read out, at every block,
            only the token's top ``C`` rows of the last block's readout, and compute the four
            channels within them (an approximation: ``C >= max(top_k, 2)``).

    Returns:
        ``[B, R, 4]``: top-1 probability, its margin over the runner-up, the entropy of the top-``K``
        probabilities renormalised, and ``log1p`` of the rank of the token the last block prefers.
    """
    n_tok, n_blocks, dim = r_after.shape
    if n_tok == 0:
        return r_after.new_zeros(n_blocks, 0, 4)
    flat = final_norm(r_after.transpose(0, 1).reshape(-1, dim))  # [B*R, d], block-major
    last = flat[-n_tok:]  # the final block's rows: what the model outputs
    if candidates:
        c = min(candidates, readout.shape[0])
        cand = torch.nn.functional.linear(last, readout).topk(c, dim=-1).indices  # [R, C], column 0 = the choice
        rows = readout[cand]  # [R, C, d]
        logits = torch.einsum("brd,rcd->brc", flat.reshape(n_blocks, n_tok, dim), rows).float().reshape(-1, c)
        return _lens_channels(logits, torch.zeros(logits.shape[0], dtype=torch.long), top_k).reshape(n_blocks, n_tok, 4)
    final_choice = torch.nn.functional.linear(last, readout).argmax(-1).repeat(n_blocks)  # [B*R]
    parts = []
    for i in range(0, flat.shape[0], 256):  # bounds memory at 256 x V
        logits = torch.nn.functional.linear(flat[i : i + 256], readout).float()  # [n, V]
        parts.append(_lens_channels(logits, final_choice[i : i + 256], top_k))
    return torch.cat(parts).reshape(n_blocks, n_tok, 4)


def _lens_channels(logits: torch.Tensor, chosen_index: torch.Tensor, top_k: int) -> torch.Tensor:
    """``[n, V']`` readout logits, ``[n]`` column of the finally chosen token -> ``[n, 4]`` lens channels."""
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    top = logits.topk(max(top_k, 2), dim=-1).values  # [n, K]
    p_top = (top - logz).exp()
    q = torch.softmax(top, dim=-1)
    chosen = logits.gather(1, chosen_index[:, None])
    rank = (logits > chosen).sum(-1).float()
    ent = -(q * q.clamp_min(1e-30).log()).sum(-1)
    return torch.stack([p_top[:, 0], p_top[:, 0] - p_top[:, 1], ent, torch.log1p(rank)], dim=-1)


# ------------------------------------------------------------------------------ token confidence
#: Columns of :func:`token_confidence_summary`, in order (higher = less confident).
TOKEN_CONFIDENCE_NAMES: tuple[str, ...] = ("-mean log p", "-min log p", "mean entropy")


def token_confidence_rows(
    r_before: torch.Tensor,
    final_norm: NormFn,
    readout: torch.Tensor,
    tokens: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Log-probability and entropy of each token under the model's own output distribution.

    The distribution of token ``p`` is read from the final residual at ``p - 1`` (what the model
    output when it chose ``p``), so the rows depend on one position's states each: a streaming
    caller may cache them.

    Args:
        r_before: ``[R, d]`` the residual after the last block at each token's predicting position.
        final_norm: ``N_B``, the norm before the readout.
        readout: ``W``, ``[V, d]``.
        tokens: ``[R]`` the tokens that were chosen.
        softcap: The model's ``final_logit_softcapping`` (Gemma 2), applied as its forward does.

    Returns:
        ``[R, 2]``: ``log p(token)`` and the entropy (nats) of the whole-vocabulary distribution.
    """
    out = r_before.new_zeros(tokens.shape[0], 2, dtype=torch.float32)
    tokens = tokens.to(r_before.device)
    for i in range(0, tokens.shape[0], 256):
        out[i : i + 256] = _log_p_and_entropy(final_norm(r_before[i : i + 256]), readout, tokens[i : i + 256], softcap)
    return out


def _log_p_and_entropy(
    x: torch.Tensor, readout: torch.Tensor, tokens: torch.Tensor, softcap: float | None
) -> torch.Tensor:
    """``[n, d]`` normed states -> ``[n, 2]`` (log p of ``tokens``, entropy) by an online log-sum-exp
    over :func:`vocabulary_blocks`: no ``[n, V]`` product is held."""
    n = x.shape[0]
    peak = torch.full((n,), -math.inf, device=x.device)
    total = torch.zeros(n, device=x.device)  # sum of exp(logit - peak)
    moment = torch.zeros(n, device=x.device)  # sum of exp(logit - peak) * logit
    chosen = torch.zeros(n, device=x.device)
    for cols in vocabulary_blocks(readout.shape[0], n):
        logits = torch.nn.functional.linear(x, readout[cols]).float()  # [n, width]
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        new_peak = torch.maximum(peak, logits.max(-1).values)
        scale = (peak - new_peak).exp()
        e = (logits - new_peak[:, None]).exp()
        total = total * scale + e.sum(-1)
        moment = moment * scale + (e * logits).sum(-1)
        peak = new_peak
        inside = (tokens >= cols.start) & (tokens < cols.stop)
        local = (tokens - cols.start).clamp(0, logits.shape[1] - 1)
        chosen = torch.where(inside, logits.gather(-1, local[:, None]).squeeze(-1), chosen)
    log_z = peak + total.log()
    # H = -sum p log p = log Z - E_p[logit].
    return torch.stack([chosen - log_z, log_z - moment / total], dim=-1)


def token_confidence_summary(rows: torch.Tensor) -> torch.Tensor:
    """``[R, 2]`` rows of :func:`token_confidence_rows` -> ``[3]`` :data:`TOKEN_CONFIDENCE_NAMES`.

    The answer's token confidence as single-pass baselines read it (lm-polygraph's perplexity,
    maximum token probability and mean token entropy): ``-mean log p``, ``-min log p`` and the
    mean entropy. No rows (an answer with no content tokens) gives zeros; callers flag those answers.
    """
    if rows.shape[0] == 0:
        return rows.new_zeros(3)
    logp, ent = rows[:, 0], rows[:, 1]
    return torch.stack([-logp.mean(), -logp.min(), ent.mean()])
