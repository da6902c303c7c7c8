"""The tensor math of flow signatures (spec ``flow-signatures.md`` §1–§5). No hooks, no I/O.

Shapes use ``R`` for the masked tokens of one sample, ``B`` for blocks, ``d`` for the hidden size,
``k`` for the subspace dimension, ``V`` for the vocabulary and ``J`` for the number of windows.
Every function works in float32 on whatever device its inputs are on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hf_flowcheck.configuration import EPS, FlowConfig
from hf_flowcheck.readout import candidate_rows, rank_top, readout_top

__all__ = [
    "SampleGeometry",
    "WindowLayout",
    "block_updates",
    "boundary_states",
    "closed_form_norm_jvp",
    "competitor_directions",
    "directions_from_top",
    "fit_basis",
    "fit_sample_bases",
    "flow_features",
    "grassmann_drift",
    "path_integrated_updates",
    "robust_center",
    "sample_flow_features",
    "select_readout_pairs",
    "token_key",
    "transport",
    "window_layout",
]


NormFn = Callable[[torch.Tensor], torch.Tensor]

#: Readout directions shorter than this are dropped (A.5).
MIN_DIRECTION_NORM = 1e-6
#: Weiszfeld iterations for the geometric median (A.7).
WEISZFELD_ITERS = 32
#: Simpson nodes and weights on alpha in [0, 1] (B.7).
SIMPSON = ((0.0, 1.0 / 6.0), (0.5, 4.0 / 6.0), (1.0, 1.0 / 6.0))


# --------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class WindowLayout:
    """Depth windows of A.3, 0-indexed.

    Attributes:
        starts: ``b_j`` for each window, length ``J``.
        ends: ``e_j`` for each window, length ``J``.
        assign: ``j(b)`` for ``b = 0..B`` (length ``B + 1``; the final boundary belongs to the last window).
    """

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    assign: tuple[int, ...]

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def pool_blocks(self, j: int) -> list[int]:
        """Boundary indices whose directions feed window ``j``'s pool (spec §3)."""
        blocks = list(range(self.starts[j], self.ends[j] + 1))
        if j == self.num_windows - 1:
            blocks.append(len(self.assign) - 1)
        return blocks


def window_layout(num_blocks: int, length: int, stride: int) -> WindowLayout:
    """Windows and the assignment ``j(b)`` exactly as A.3 (earliest window containing ``b``).

    Example:
        >>> w = window_layout(10, 4, 2)
        >>> w.starts, w.ends, [j + 1 for j in w.assign[:10]]
        ((0, 2, 4, 6), (3, 5, 7, 9), [1, 1, 1, 1, 2, 2, 3, 3, 4, 4])
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks={num_blocks} must be at least 1.")
    b_last = max(0, num_blocks - length)
    n_win = math.ceil(b_last / stride) + 1
    starts = tuple(min(j * stride, b_last) for j in range(n_win))
    ends = tuple(min(b + length - 1, num_blocks - 1) for b in starts)
    assign = [min(n_win, math.ceil(max(0, b - (length - 1)) / stride) + 1) - 1 for b in range(num_blocks)]
    assign.append(n_win - 1)
    return WindowLayout(starts, ends, tuple(assign))


# ------------------------------------------------------------------------- competitors and bases
def sample_seed(sample_key: int, window: int, seed0: int) -> int:
    """``hash(sample_key, j, seed0)`` as a stable 63-bit integer (independent of Python's hash salt)."""
    digest = hashlib.blake2b(f"{sample_key}:{window}:{seed0}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def token_key(token_ids: torch.Tensor) -> int:
    """Default per-sample key: a hash of the sample's (unpadded) token ids."""
    data = token_ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def select_readout_pairs(
    num_tokens: int, layout: WindowLayout, num_competitors: int, cap: int, sample_key: int, seed0: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Which ``(t, b)`` pairs are read out for each window's pool (spec §3, the cap).

    Pairs are enumerated block-major (all tokens of the first pool block, then the next, ...). When
    ``pairs * K > cap`` a seeded subset of ``ceil(cap / K)`` pairs is kept, chosen before any logits exist.

    Returns:
        For each window, ``(t_idx, b_idx)``: long tensors ``[P_j]`` on the CPU.
    """
    out = []
    per_window = math.ceil(cap / num_competitors)
    for j in range(layout.num_windows):
        blocks = torch.tensor(layout.pool_blocks(j), dtype=torch.long)
        b_idx = blocks.repeat_interleave(num_tokens)
        t_idx = torch.arange(num_tokens).repeat(len(blocks))
        if b_idx.numel() * num_competitors > cap:
            gen = torch.Generator().manual_seed(sample_seed(sample_key, j, seed0))
            keep = torch.randperm(b_idx.numel(), generator=gen)[:per_window]
            b_idx, t_idx = b_idx[keep], t_idx[keep]
        out.append((t_idx, b_idx))
    return out


def competitor_directions(logits: torch.Tensor, readout: torch.Tensor, num_competitors: int) -> torch.Tensor:
    """Normalized competitor directions ``(w_top - w_y)/(||.||+eps)`` for each row (Eq. 21, 24).

    Args:
        logits: ``[P, V]`` readouts ``W h``.
        readout: ``W``, ``[V, d]``.
        num_competitors: ``K``.

    Returns:
        ``[M, d]`` float32 directions with ``M <= P*K``; too-short ones are dropped.
    """
    if logits.shape[0] == 0:
        return readout.new_zeros((0, readout.shape[1]), dtype=torch.float32)
    return directions_from_top(rank_top(logits, min(num_competitors, logits.shape[1] - 1) + 1), readout)


def directions_from_top(top: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """:func:`competitor_directions` from each row's ranked ids ``[P, K+1]`` (top token first) -> ``[M, d]``."""
    if top.shape[0] == 0:
        return readout.new_zeros((0, readout.shape[1]), dtype=torch.float32)
    k = top.shape[1] - 1
    w_top = readout[top[:, 0]].float()  # [P, d]
    w_comp = readout[top[:, 1:].reshape(-1)].float().view(top.shape[0], k, -1)
    a = (w_top[:, None, :] - w_comp).reshape(-1, readout.shape[1])
    norms = a.norm(dim=-1, keepdim=True)
    keep = norms.squeeze(-1) >= MIN_DIRECTION_NORM
    return (a / (norms + EPS))[keep]


def complete_basis(partial: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    """Complete ``partial`` ``[d, r]`` orthonormal columns to ``k`` with ``I_d`` projected off its span (A.5)."""
    eye = torch.eye(dim, dtype=torch.float32, device=partial.device)
    if partial.shape[1] == 0:
        return eye[:, :k].clone()
    resid = eye - partial @ partial.T
    # Take the first identity columns that still have a component outside the span.
    cols = [partial]
    have = partial.shape[1]
    for i in range(dim):
        if have >= k:
            break
        v = resid[:, i : i + 1]
        for c in cols[1:]:
            v = v - c @ (c.T @ v)
        n = v.norm()
        if n > 1e-4:
            cols.append(v / n)
            have += 1
    q, _ = torch.linalg.qr(torch.cat(cols, dim=1))
    return q[:, :k]


#: Block size (times k), iterations and the accepted bound on ``sin`` of the largest principal angle
#: to the exact subspace, for ``basis_solver="subspace"``. In float32 the bound sits at its noise
#: floor (about 2e-4 on SmolLM2's windows, whatever the iterations) while the measured angle is about
#: 1e-5, so the tolerance is set above that floor.
SUBSPACE_BLOCK, SUBSPACE_ITERS, SUBSPACE_TOL = 2, 16, 2e-3


def _top_subspace(gram: torch.Tensor, k: int, n_dir: int) -> torch.Tensor | None:
    """Top-``k`` eigenvectors of a PSD ``[d, d]`` matrix by block subspace iteration, or ``None``.

    A seeded block of ``2k`` columns, ``SUBSPACE_ITERS`` multiply-and-orthonormalize steps and a
    Rayleigh–Ritz step: the error falls like ``(lambda_{2k+1} / lambda_k)^iters``. The result is kept
    only when the Davis–Kahan bound ``||G V - V Theta||_F / (theta_k - theta_{k+1})`` on the sine of
    its largest angle to the exact top-``k`` subspace is below ``SUBSPACE_TOL`` and the ``k`` values
    pass the eigensolve's rank test (the same tolerance, from ``n_dir`` directions); otherwise
    ``None`` (the caller runs the full eigensolve).
    """
    dim = gram.shape[0]
    block = min(SUBSPACE_BLOCK * k, dim)
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.linalg.qr(torch.randn(dim, block, generator=gen).to(gram))[0]
    for _ in range(SUBSPACE_ITERS):
        q = torch.linalg.qr(gram @ q)[0]
    theta, vecs = torch.linalg.eigh(q.T @ gram @ q)
    theta, vecs = theta.flip(0), vecs.flip(1)
    v = q @ vecs[:, :k]
    top, gap = float(theta[0]), float(theta[k - 1] - theta[k]) if block > k else 0.0
    rank_tol = top**0.5 * (max(n_dir, dim) * torch.finfo(torch.float32).eps) ** 0.5
    if top <= 0 or gap <= 0 or float(theta[k - 1].clamp_min(0).sqrt()) <= rank_tol:
        return None
    if float((gram @ v - v * theta[:k]).norm()) / gap > SUBSPACE_TOL:
        return None
    return torch.linalg.qr(v)[0]


def fit_basis(directions: torch.Tensor, dim: int, k: int, solver: str = "eigh") -> torch.Tensor:
    """Top-``k`` right singular vectors of the direction matrix, re-orthonormalized (Eq. 26–27, A.5).

    Args:
        directions: ``D_j``, ``[M, d]``.
        dim: ``d`` (needed when ``M = 0``).
        k: Subspace dimension.
        solver: ``"eigh"`` (the full eigensolve) or ``"subspace"`` (block subspace iteration with a
            residual check, falling back to the eigensolve; ``FlowConfig.basis_solver``). Used when
            ``M >= 4k``; fewer directions always take the thin SVD.

    Returns:
        ``U_j``, ``[d, k]`` with orthonormal columns.
    """
    eye = torch.eye(dim, dtype=torch.float32, device=directions.device)
    n_dir = directions.shape[0]
    if n_dir == 0:
        return eye[:, :k].clone()
    gram = directions.T @ directions if n_dir >= 4 * k else None
    if solver == "subspace" and gram is not None and 4 * k <= dim:
        fast = _top_subspace(gram, k, n_dir)
        if fast is not None:
            return fast
    if gram is None:
        # Few directions: an exact thin SVD is cheap, and its rank test is the sharpest.
        _, sv, vh = torch.linalg.svd(directions, full_matrices=False)
        tol = sv.max() * max(directions.shape) * torch.finfo(torch.float32).eps
        vecs = vh.T
    else:
        # Many directions: the top right singular vectors are the top eigenvectors of D^T D, which
        # costs a d x d eigensolve instead of an M x d SVD (3x faster at M=1024, d=576).
        evals, evecs = torch.linalg.eigh(gram)
        sv = evals.flip(0).clamp_min(0).sqrt()
        vecs = evecs.flip(1)
        tol = sv.max() * (max(directions.shape) * torch.finfo(torch.float32).eps) ** 0.5
    rank = int((sv > tol).sum())
    if rank == 0:
        return eye[:, :k].clone()
    q, _ = torch.linalg.qr(vecs[:, : min(k, rank)])
    if q.shape[1] < k:
        q = complete_basis(q, dim, k)
    return q


def transport(u_from: torch.Tensor, u_to: torch.Tensor, min_overlap: float = 0.0) -> torch.Tensor:
    """Procrustes transport ``R = P Q^T`` with ``U_to^T U_from = P Σ Q^T`` (Eq. 29–30, 34).

    Args:
        u_from: ``[d, k]``.
        u_to: ``[d, k]``.
        min_overlap: ``tau_sigma``; return ``I_k`` when the smallest singular value is below it.

    Returns:
        ``[k, k]`` orthogonal.
    """
    p, s, qh = torch.linalg.svd(u_to.T @ u_from)
    if min_overlap > 0 and float(s.min()) < min_overlap:
        return torch.eye(u_from.shape[1], dtype=u_from.dtype, device=u_from.device)
    return p @ qh


def grassmann_drift(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``d_G = ||U U^T - V V^T||_2`` (spectral norm), a scalar tensor."""
    return torch.linalg.matrix_norm(u @ u.T - v @ v.T, ord=2)


# ----------------------------------------------------------------------------------- centering
def robust_center(x: torch.Tensor, method: str) -> torch.Tensor:
    """Center of the rows of ``x`` (A.7); zero when there are no rows.

    ``geometric_median`` runs Weiszfeld from the mean for 32 iterations with eps 1e-6;
    ``coordinate_median`` uses numpy's even-count convention (mean of the two middle values).

    Args:
        x: ``[n, k]``, or ``[n, G, k]`` for ``G`` independent groups (one center each).
        method: ``"geometric_median"``, ``"coordinate_median"`` or ``"mean"``.

    Returns:
        ``[k]`` (or ``[G, k]``).
    """
    if x.shape[0] == 0:
        return x.new_zeros(x.shape[1:])
    if method == "mean":
        return x.mean(0)
    if method == "coordinate_median":
        return torch.quantile(x, 0.5, dim=0)
    if method != "geometric_median":
        raise ValueError(f"center={method!r}: use 'geometric_median', 'coordinate_median' or 'mean'.")
    mu = x.mean(0)
    for _ in range(WEISZFELD_ITERS):
        w = 1.0 / ((x - mu).norm(dim=-1, keepdim=True) + EPS)
        mu = (w * x).sum(0) / w.sum(0)
    return mu


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + EPS)


def stable_angle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between the last-dim vectors of ``a`` and ``b``: ``2·atan2(|â-b̂|, |â+b̂|)``; 0 for a zero vector."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua = a / na.clamp_min(torch.finfo(a.dtype).tiny)
    ub = b / nb.clamp_min(torch.finfo(b.dtype).tiny)
    ang = 2.0 * torch.atan2((ua - ub).norm(dim=-1), (ua + ub).norm(dim=-1))
    zero = (na.squeeze(-1) == 0) | (nb.squeeze(-1) == 0)
    return torch.where(zero, torch.zeros_like(ang), ang)


# ------------------------------------------------------------------------------------ the JVPs
def norm_jvp(norm: NormFn, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``J_N(x) v`` row-wise: the norm's verified closed form when it has one (see
    :func:`closed_form_norm_jvp`), else ``torch.func.jvp`` on the real norm module."""
    fast = getattr(norm, "flowcheck_jvp", None)
    if fast is not None:
        return fast(x, v)
    return torch.func.jvp(norm, (x,), (v,))[1]


def closed_form_norm_jvp(norm: nn.Module, dim: int, seed: int = 0) -> Callable | None:
    """A closed-form ``(x, v) -> J_N(x) v`` for an RMSNorm- or LayerNorm-style module, or ``None``.

    ``torch.func.jvp`` costs a few milliseconds of set-up per call, which dominates when a
    streaming check adds one token at a time. Norms of the form ``N(x) = g * n(x) (+ beta)`` with
    ``n`` the RMS or the mean-and-variance normalisation get the closed form; which ``g``
    (``weight``, ``1 + weight``) and ``eps`` is found by matching the module's own output, and the
    result is accepted only if it also matches ``torch.func.jvp`` on random probes (else ``None``,
    and the generic JVP is used).

    Args:
        norm: A float32 norm module (the extractor's copy).
        dim: Its width ``d``.
        seed: Seed of the probes.

    Returns:
        ``jvp(x [n, d], v [n, d]) -> [n, d]`` or ``None``.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.shape != (dim,):
        return None
    eps_values = [getattr(norm, n) for n in ("variance_epsilon", "eps", "epsilon") if hasattr(norm, n)]
    eps_values = [float(e) for e in eps_values if isinstance(e, (int, float))]
    if not eps_values:
        return None
    w = weight.detach().float()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, dim, generator=g).to(w.device) * 3.0 + 0.5
    v = torch.randn(4, dim, generator=g).to(w.device)
    with torch.no_grad():
        y = norm(x).float()
        ref = torch.func.jvp(norm, (x,), (v,))[1].float()
    for centered in (False, True):
        for eps in eps_values:
            for gain in (w, 1.0 + w):

                def jvp(x: torch.Tensor, v: torch.Tensor, gain=gain, eps=eps, centered=centered) -> torch.Tensor:
                    if centered:
                        x = x - x.mean(-1, keepdim=True)
                        v = v - v.mean(-1, keepdim=True)
                    s = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
                    return gain * (s * v - x * s.pow(3) * (x * v).mean(-1, keepdim=True))

                xc = x - x.mean(-1, keepdim=True) if centered else x
                n = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
                beta = y - gain * n
                if not torch.allclose(beta, beta[:1].expand_as(beta), rtol=1e-4, atol=1e-5):
                    continue  # not this form: what is left is not a constant bias
                if torch.allclose(jvp(x, v), ref, rtol=1e-4, atol=1e-5):
                    return jvp
    return None


def path_integrated_updates(
    norm: NormFn, r_in: torch.Tensor, r_out: torch.Tensor, o: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simpson path integrals of the next norm's Jacobian along the block update (Eq. 12–13, B.7).

    Args:
        norm: ``N_{b+1}``.
        r_in: ``r[t, b]``, ``[R, d]``.
        r_out: ``r[t, b+1]``, ``[R, d]``.
        o: ``o[t, b]``, ``[R, d]``.
        m: ``m[t, b]``, ``[R, d]``.

    Returns:
        ``(q_attn, q_mlp, q_end)`` in ``d``-space, each ``[R, d]``:
        ``∫J(r_in + α·inj) o dα``, the same for ``m``, and ``J(r_out) inj``.
    """
    inj = o + m
    n = r_in.shape[0]
    xs = torch.cat([r_in + a * inj for a, _ in SIMPSON] * 2 + [r_out], dim=0)
    vs = torch.cat([o] * len(SIMPSON) + [m] * len(SIMPSON) + [inj], dim=0)
    jv = norm_jvp(norm, xs, vs)
    q_attn = sum(w * jv[i * n : (i + 1) * n] for i, (_, w) in enumerate(SIMPSON))
    off = len(SIMPSON) * n
    q_mlp = sum(w * jv[off + i * n : off + (i + 1) * n] for i, (_, w) in enumerate(SIMPSON))
    q_end = jv[2 * off :]
    return q_attn, q_mlp, q_end


def block_updates(
    r: torch.Tensor,
    o: torch.Tensor,
    m: torch.Tensor,
    norms: Sequence[NormFn],
    project: torch.Tensor | None = None,
) -> torch.Tensor:
    """The path-integrated updates of every block, in ``d``-space or projected block by block.

    Each token's rows depend on that token's states only (a streaming caller may cache them).

    Args:
        r: ``[R, B+1, d]`` raw residual states.
        o: ``[R, B, d]``.
        m: ``[R, B, d]``.
        norms: ``N_0..N_B``.
        project: Optional ``[B, d, k]`` basis per block: each block's updates are projected as soon as
            they are computed, so the ``[R, B, 3, d]`` tensor (the size of the capture itself) is
            never held.

    Returns:
        ``[R, B, 3, d]`` (or ``[R, B, 3, k]`` with ``project``): ``(q_attn, q_mlp, q_end)`` of
        :func:`path_integrated_updates` per block.
    """
    n_tok, n_blocks = o.shape[0], o.shape[1]
    width = r.shape[-1] if project is None else project.shape[-1]
    out = r.new_empty(n_tok, n_blocks, 3, width)
    for b in range(n_blocks):
        q = torch.stack(path_integrated_updates(norms[b + 1], r[:, b], r[:, b + 1], o[:, b], m[:, b]), dim=1)
        out[:, b] = q if project is None else q @ project[b]
    return out


# ------------------------------------------------------------------------------------ features
@dataclass
class SampleGeometry:
    """Intermediate results for one sample, kept for tests, refinement and reports.

    Attributes:
        bases: ``U_j`` per window, each ``[d, k]``.
        transports: ``R_{j->j+1}`` per window switch, each ``[k, k]``.
        layout: The window layout.
    """

    bases: list[torch.Tensor]
    transports: list[torch.Tensor]
    layout: WindowLayout


def boundary_states(
    r: torch.Tensor, norms: Sequence[NormFn], betas: torch.Tensor, boundary: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monitored states ``h`` and bias-centered ``h̃`` (§1).

    Args:
        r: ``[R, B+1, d]`` raw residual states.
        norms: ``N_0..N_B``.
        betas: ``[B+1, d]`` norm biases (zeros when a norm has none).
        boundary: ``"normalized"`` or ``"residual"``.

    Returns:
        ``(h, h_tilde)``, each ``[R, B+1, d]``.
    """
    if boundary == "residual":
        return r, r
    h = torch.stack([norms[b](r[:, b]) for b in range(r.shape[1])], dim=1).float()
    return h, h - betas[None]


def fit_sample_bases(
    h: torch.Tensor,
    readout: torch.Tensor,
    layout: WindowLayout,
    config: FlowConfig,
    sample_key: int,
) -> list[torch.Tensor]:
    """One sample's window bases ``U_j`` from its own competitor directions (§3).

    All windows' readouts go through one :func:`readout_top` over the pairs the direction cap keeps.

    Args:
        h: ``[R, B+1, d]`` monitored states.
        readout: ``[V, d]``.
        layout: Windows.
        config: Flow config (``num_competitors``, ``direction_cap``, ``subspace_dim``, ``seed``).
        sample_key: Stable per-sample key for the cap's sampler.

    Returns:
        ``J`` tensors ``[d, k]``.
    """
    n_tok, _, dim = h.shape
    pairs = select_readout_pairs(n_tok, layout, config.num_competitors, config.direction_cap, sample_key, config.seed)
    sizes = [t.numel() for t, _ in pairs]
    if sum(sizes) == 0:
        return [fit_basis(h.new_zeros((0, dim)), dim, config.subspace_dim) for _ in pairs]
    t_all = torch.cat([t for t, _ in pairs]).to(h.device)
    b_all = torch.cat([b for _, b in pairs]).to(h.device)
    states = h[t_all, b_all]  # [P, d]
    w = readout if readout.dtype == torch.float32 else readout.float()
    if config.competitor_candidates:
        # Ranking within an ascending-id subset keeps "ties to the smaller token id" (rank_top's order).
        w = w[candidate_rows(h[:, -1], w, config.competitor_candidates)]
    # The only V-wide readout, in vocabulary blocks (READOUT_BLOCK_ELEMENTS).
    top = readout_top(states, w, min(config.num_competitors, w.shape[0] - 1) + 1)
    bases = []
    start = 0
    for size in sizes:
        dirs = directions_from_top(top[start : start + size], w)
        bases.append(fit_basis(dirs, dim, config.subspace_dim, config.basis_solver))
        start += size
    return bases


def flow_features(
    h: torch.Tensor,
    h_tilde: torch.Tensor,
    r: torch.Tensor,
    o: torch.Tensor,
    m: torch.Tensor,
    norms: Sequence[NormFn],
    bases: Sequence[torch.Tensor],
    layout: WindowLayout,
    config: FlowConfig,
    updates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SampleGeometry]:
    """The per-event features of one sample given its window bases (§4–§5).

    Args:
        h: ``[R, B+1, d]`` monitored states (unused beyond shape; kept for symmetry with the spec).
        h_tilde: ``[R, B+1, d]`` bias-centered monitored states.
        r: ``[R, B+1, d]`` raw residual states.
        o: ``[R, B, d]`` attention-path contributions.
        m: ``[R, B, d]`` MLP-path contributions.
        norms: ``N_0..N_B`` (the JVPs use ``N_{b+1}`` in both boundary modes).
        bases: ``J`` tensors ``[d, k]``.
        layout: Windows.
        config: Flow config.
        updates: Optional ``[R, B, 3, d]`` :func:`block_updates` of these states (computed if ``None``).

    Returns:
        ``(features [B, R, F], geometry)`` with ``F = config.num_features`` in ``config.feature_names`` order.
    """
    n_tok, n_bound, _ = h_tilde.shape
    n_blocks = n_bound - 1
    k = config.subspace_dim
    assign = torch.tensor(layout.assign, device=h_tilde.device)
    ub = torch.stack(list(bases))  # [J, d, k]
    trans = [transport(bases[j], bases[j + 1], config.transport_min_overlap) for j in range(len(bases) - 1)]
    eye = torch.eye(k, dtype=torch.float32, device=h_tilde.device)
    r_steps = torch.stack(
        [eye if layout.assign[b + 1] == layout.assign[b] else trans[layout.assign[b]] for b in range(n_blocks)]
    )  # [B, k, k]
    u_bound = ub[assign]  # [B+1, d, k]
    u_tgt = u_bound[1:]  # [B, d, k]

    p = torch.einsum("tbd,bdk->tbk", h_tilde, u_bound)  # [R, B+1, k]
    p_prev = torch.einsum("bkl,tbl->tbk", r_steps, p[:, :-1])
    dp = p[:, 1:] - p_prev  # [R, B, k]
    step = dp.norm(dim=-1)
    centers = robust_center(dp, config.center)  # [B, k], one center per depth step
    step_c = (dp - centers[None]).norm(dim=-1)
    turn = stable_angle(p[:, 1:], p_prev)
    attn_mag = torch.einsum("tbd,bdk->tbk", o, u_tgt).norm(dim=-1)
    mlp_mag = torch.einsum("tbd,bdk->tbk", m, u_tgt).norm(dim=-1)

    if updates is None:
        q = block_updates(r, o, m, norms, project=u_tgt)  # [R, B, 3, k]
    else:
        q = torch.einsum("tbsd,bdk->tbsk", updates, u_tgt)
    q_attn, q_mlp, q_end = q[:, :, 0], q[:, :, 1], q[:, :, 2]
    dq = q_attn + q_mlp
    update_mag = dq.norm(dim=-1)
    resid_ratio = (dq - q_end).norm(dim=-1) / (update_mag + EPS)

    anchors = layout.ends if config.drift_anchor == "end" else layout.starts
    drift = h_tilde.new_zeros(n_tok)
    for j in range(layout.num_windows - 1):
        v = h_tilde[:, anchors[j]]  # [R, d]
        diff = (v @ bases[j + 1]) @ bases[j + 1].T - (v @ bases[j]) @ bases[j].T
        drift = drift + diff.norm(dim=-1) / (v.norm(dim=-1) + EPS)

    cols = [step, step_c, turn, attn_mag, mlp_mag, update_mag, resid_ratio, drift[:, None].expand(-1, n_blocks)]
    if config.features == "full":
        u_next = _unit(p[:, 1:])

        def perp(x: torch.Tensor) -> torch.Tensor:
            return x - (x * u_next).sum(-1, keepdim=True) * u_next

        dq_perp = perp(dq).norm(dim=-1) + EPS
        attn_ratio = perp(q_attn).norm(dim=-1) / dq_perp
        mlp_ratio = perp(q_mlp).norm(dim=-1) / dq_perp
        for ratio in (attn_ratio, mlp_ratio):
            med = torch.quantile(ratio, 0.5, dim=1) if n_tok else ratio.new_zeros(0)
            cols.append(med[:, None].expand(-1, n_blocks))
    feats = torch.stack(cols, dim=-1).transpose(0, 1).contiguous()  # [B, R, F]
    return feats, SampleGeometry(list(bases), trans, layout)


def sample_flow_features(
    r: torch.Tensor,
    o: torch.Tensor,
    m: torch.Tensor,
    norms: Sequence[NormFn],
    betas: torch.Tensor,
    readout: torch.Tensor,
    config: FlowConfig,
    sample_key: int,
    bases: Sequence[torch.Tensor] | None = None,
    updates: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SampleGeometry]:
    """Everything for one sample: monitored states, bases (unless given), features.

    Args:
        r: ``[R, B+1, d]`` float32 residual states of the masked tokens, in sequence order.
        o: ``[R, B, d]``.
        m: ``[R, B, d]``.
        norms: ``N_0..N_B`` as float32 callables.
        betas: ``[B+1, d]``.
        readout: ``W``, ``[V, d]``.
        config: Flow config.
        sample_key: Stable per-sample key (see :func:`token_key`).
        bases: Optional precomputed window bases (tests use this to rotate the gauge).
        updates: Optional precomputed ``[R, B, 3, d]`` :func:`block_updates`.

    Returns:
        ``(features [B, R, F], geometry)``.
    """
    n_blocks = o.shape[1]
    layout = window_layout(n_blocks, config.window_length, config.window_stride)
    h, h_tilde = boundary_states(r, norms, betas, config.boundary)
    if bases is None:
        bases = fit_sample_bases(h, readout, layout, config, sample_key)
    return flow_features(h, h_tilde, r, o, m, norms, bases, layout, config, updates)
