"""The readout-aligned step clamp of spec §7 on one block, as a reversible hook pair.

:class:`BlockClamp` is the operator refinement applies while it regenerates; it knows nothing of
validators or generation, only a block, a basis and the positions to patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_flowcheck.configuration import EPS
from hf_flowcheck.errors import RefinementError

__all__ = ["BasisFn", "BlockClamp", "ClampStats", "hidden_from_args"]


#: ``basis_fn(h_in [d]) -> U [d, k]``: fits the basis from the block input at ``t0`` (first row).
BasisFn = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------- the patch
def hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a decoder block was called with (first positional or ``hidden_states=``)."""
    if args:
        return args[0]
    return kwargs["hidden_states"]


@dataclass
class ClampStats:
    """What a :class:`BlockClamp` did.

    Attributes:
        s_ref: The reference step scale (``nan`` before it is known).
        n_cal_used: Calibration positions ``s_ref`` was computed from (0 when ``s_ref`` was given).
        positions_patched: ``(row, position)`` pairs at positions ``>= t0`` that went through the clamp.
        positions_clamped: Those with ``λ < 1``.
        lambdas: ``λ`` of every patched pair, in call order.
    """

    s_ref: float = float("nan")
    n_cal_used: int = 0
    positions_patched: int = 0
    positions_clamped: int = 0
    lambdas: list[float] = field(default_factory=list)

    @property
    def mean_lambda(self) -> float:
        """Mean ``λ`` over patched positions (``nan`` if none)."""
        return sum(self.lambdas) / len(self.lambdas) if self.lambdas else float("nan")

    @property
    def max_lambda(self) -> float:
        return max(self.lambdas) if self.lambdas else float("nan")


class BlockClamp:
    """The readout-aligned step clamp of spec §7 on one block, as a reversible hook pair.

    A forward pre-hook keeps the block's raw residual input ``h_in`` ``[batch, S, d]``; a forward
    hook rewrites its output ``h_out`` (the first element when the block returns a tuple; the same
    structure is returned). Positions are tracked as absolute sequence indices: the first forward
    call through the block covers ``start .. start+S-1``, each later call continues where the
    previous one ended (a decode step is one position). All rows of a batch share the positions.

    For positions ``>= t0``: ``Δp = Uᵀ(h_out - h_in)``, ``λ = min(1, α·s_ref/(‖Δp‖ + eps))``,
    ``h_out' = h_out + U(λΔp - Δp)`` (computed in float32, cast back).

    ``basis`` and ``s_ref`` may be given, or found on the fly: ``basis_fn`` receives the float32
    block input at ``t0`` of the first row (``[d]``) when ``t0`` is first seen; with ``s_ref=None``
    the reference scale is the median of ``‖Uᵀ(h_out - h_in)‖`` over the positions
    ``calibration_start .. t0-1`` (all rows) seen before or in the call that reaches ``t0``.

    Args:
        block: The block module to patch.
        t0: First patched sequence position.
        basis: ``U``, ``[d, k]`` with orthonormal columns, or ``None`` with ``basis_fn``.
        s_ref: Reference step scale, or ``None`` to calibrate.
        alpha: Clamp ratio ``α`` (``> 0``; the paper uses ``1.05``).
        start: Absolute position of the first token of the first forward call.
        calibration_start: First calibration position (default ``max(start, t0 - 64)``).
        basis_fn: Fits ``U`` from the block input at ``t0`` when ``basis`` is ``None``.
        stop: First position no longer patched (``None``: patch every position from ``t0`` on).
        eps: Denominator safeguard (default :data:`hf_flowcheck.configuration.EPS`).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
        ...     num_attention_heads=4, intermediate_size=37)).eval()
        >>> u, _ = torch.linalg.qr(torch.randn(32, 4))
        >>> with BlockClamp(model.model.layers[1], t0=3, basis=u, alpha=1e-3, s_ref=1.0) as clamp:
        ...     _ = model(torch.tensor([[5, 6, 7, 8, 9]]))
        >>> clamp.stats.positions_patched, clamp.stats.max_lambda <= 1.0
        (2, True)
    """

    def __init__(
        self,
        block: nn.Module,
        t0: int,
        *,
        basis: torch.Tensor | None = None,
        s_ref: float | None = None,
        alpha: float = 1.05,
        start: int = 0,
        calibration_start: int | None = None,
        basis_fn: BasisFn | None = None,
        stop: int | None = None,
        eps: float = EPS,
    ) -> None:
        if basis is None and basis_fn is None:
            raise ValueError("BlockClamp needs basis=U ([d, k]) or basis_fn to fit it at t0.")
        if basis is not None and basis.dim() != 2:
            raise ValueError(f"basis must be [d, k], got shape {tuple(basis.shape)}.")
        if not float(alpha) > 0:
            raise ValueError(f"alpha={alpha!r} must be positive (the paper uses 1.05).")
        if s_ref is not None and not float(s_ref) >= 0:
            raise ValueError(f"s_ref={s_ref!r} must be a non-negative number.")
        if t0 < start:
            raise ValueError(f"t0={t0} lies before the first position the hook will see (start={start}).")
        if stop is not None and stop <= t0:
            raise ValueError(f"stop={stop} must lie after t0={t0} (the first position left unpatched).")
        self.block = block
        self.t0 = int(t0)
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.start = int(start)
        self.stop = None if stop is None else int(stop)
        self.calibration_start = max(self.start, self.t0 - 64) if calibration_start is None else calibration_start
        self.basis = basis.detach().float() if basis is not None else None
        self.basis_fn = basis_fn
        self.stats = ClampStats()
        if s_ref is not None:
            self.stats.s_ref = float(s_ref)
        self._s_ref_known = s_ref is not None
        self._cal: list[torch.Tensor] = []
        self._next = self.start
        self._h_in: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> BlockClamp:
        try:
            self._handles.append(self.block.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._handles.append(self.block.register_forward_hook(self._hook))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove both hooks (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._h_in = None

    @property
    def active(self) -> bool:
        return bool(self._handles)

    # --------------------------------------------------------------------------------- hooks
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._h_in = hidden_from_args(args, kwargs).detach().clone()
        return None

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        is_seq = isinstance(output, (tuple, list))
        h_out = output[0] if is_seq else output
        h_in = self._h_in
        self._h_in = None
        seq = h_out.shape[-2]
        first = self._next
        self._next += seq
        if h_in is None or h_in.shape != h_out.shape:
            raise RuntimeError(
                f"BlockClamp saw an output of shape {tuple(h_out.shape)} but an input of shape "
                f"{None if h_in is None else tuple(h_in.shape)}; the patched module is not a residual block."
            )
        pos = torch.arange(first, first + seq)
        cal = (pos >= self.calibration_start) & (pos < self.t0)
        if bool(cal.any()) and not self._s_ref_known:
            idx = cal.nonzero().squeeze(-1).to(h_out.device)
            diff = (h_out.index_select(-2, idx) - h_in.index_select(-2, idx)).float()
            self._cal.append(diff.reshape(-1, diff.shape[-1]))
        hit = pos >= self.t0
        if self.stop is not None:
            hit &= pos < self.stop
        if not bool(hit.any()):
            return None
        if self.basis is None:
            col = max(0, self.t0 - first)  # t0 is in this call: the first call with a hit reaches it
            h0 = h_in.reshape(-1, seq, h_in.shape[-1])[0, col].float()
            self.basis = self.basis_fn(h0).detach().float()
        u = self.basis.to(h_out.device)
        if not self._s_ref_known:
            self._calibrate(u)
        idx = hit.nonzero().squeeze(-1).to(h_out.device)
        diff = (h_out.index_select(-2, idx) - h_in.index_select(-2, idx)).float()
        dp = diff @ u  # [..., n, k]
        norm = dp.norm(dim=-1)
        lam = torch.clamp(self.alpha * self.stats.s_ref / (norm + self.eps), max=1.0)
        delta = ((lam - 1.0).unsqueeze(-1) * dp) @ u.T  # U(λΔp - Δp)
        new = h_out.clone()
        new.index_add_(-2, idx, delta.to(h_out.dtype))
        lam_list = lam.flatten().tolist()
        self.stats.lambdas.extend(lam_list)
        self.stats.positions_patched += len(lam_list)
        self.stats.positions_clamped += sum(1 for v in lam_list if v < 1.0)
        if is_seq:
            return type(output)((new, *output[1:])) if isinstance(output, tuple) else [new, *output[1:]]
        return new

    def _calibrate(self, u: torch.Tensor) -> None:
        if not self._cal:
            raise RefinementError(
                f"BlockClamp has no calibration positions before t0={self.t0} (calibration_start="
                f"{self.calibration_start}); pass s_ref= or start the forward earlier in the sequence."
            )
        diffs = torch.cat(self._cal).to(u.device)
        norms = (diffs @ u).norm(dim=-1)
        self.stats.s_ref = float(torch.quantile(norms, 0.5))
        self.stats.n_cal_used = int(norms.numel())
        self._s_ref_known = True
        self._cal = []
