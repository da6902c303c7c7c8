"""Recording ``r``, ``o`` and ``m`` from a running model with plain torch hooks.

:class:`FlowRecorder` is a context manager and the single owner of its hook handles: they are
registered on entry and removed in ``finally`` on exit (also when the body raises). It records only
the positions a *selector* asks for, so memory grows with the masked (response) tokens, not with
the prompt. One model forward is one *call*; the selector sees the call index and the input shape,
which is how prefill (call 0, the whole prompt) is told apart from decode steps (one token each).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hf_flowcheck.architectures import ResolvedArchitecture
from hf_flowcheck.errors import NonFiniteStateError

__all__ = [
    "CapturedStates",
    "FlowRecorder",
    "NonFiniteStateError",
    "Selector",
    "capture_sizes",
    "rows_of",
]


#: ``selector(call_index, batch, seq_len, device) -> (rows, cols, seq_pos)`` or ``None`` (keep nothing).
Selector = Callable[[int, int, int, torch.device], "tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None"]


@dataclass
class CapturedStates:
    """What a recorder captured, one row per kept ``(sample, position)``.

    Attributes:
        r: ``[N, B+1, d]`` float32 residual states entering each block, plus after the last block.
        o: ``[N, B, d]`` float32 attention-path contributions.
        m: ``[N, B, d]`` float32 MLP-path contributions.
        rows: ``[N]`` batch row of each kept position.
        positions: ``[N]`` sequence index of each kept position.
    """

    r: torch.Tensor
    o: torch.Tensor
    m: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor

    def check_finite(self, start: int = 0) -> None:
        """Raise :class:`NonFiniteStateError` naming the first (in depth) bad block and position.

        Args:
            start: Check the kept positions from this index on (a streaming caller has checked the
                earlier ones).
        """
        r, o, m, pos = self.r[start:], self.o[start:], self.m[start:], self.positions[start:]
        if bool(torch.isfinite(r).all()) and bool(torch.isfinite(o).all()) and bool(torch.isfinite(m).all()):
            return
        n_blocks = o.shape[1]
        for b in range(n_blocks + 1):
            parts = [("residual entering", r[:, b])]
            if b < n_blocks:
                parts += [("attention output of", o[:, b]), ("MLP output of", m[:, b])]
            for what, t in parts:
                bad = ~torch.isfinite(t).all(dim=-1)
                if bool(bad.any()):
                    idx = bad.nonzero().squeeze(-1)
                    i = start + int(idx[pos[idx].argmin()])
                    where = f"block {b}" if b < n_blocks else "the final norm"
                    raise NonFiniteStateError(
                        f"Non-finite value (NaN/inf) in the {what} {where} at sequence position "
                        f"{int(self.positions[i])} of batch row {int(self.rows[i])}. The model itself "
                        "overflowed there; load it in float32 or bfloat16 instead of float16."
                    )


def rows_of(buffer: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``buffer[idx]`` along dim 0, as a view when ``idx`` is an evenly spaced ascending run.

    One sample's captured rows are such a run (consecutive at batch 1, every ``N``-th at batch
    ``N``), so reading them needs no copy of the states; any other index gives the usual copy.

    Args:
        buffer: ``[K, ...]`` captured states (``CapturedStates.r``, ``.o`` or ``.m``).
        idx: ``[R]`` long row indices.

    Returns:
        ``[R, ...]``, equal to ``buffer[idx]`` (do not write to it: it may share memory with ``buffer``).
    """
    n = idx.numel()
    if n == 0:
        return buffer[idx]
    start = int(idx[0])
    step = int(idx[1] - idx[0]) if n > 1 else 1
    if step > 0 and bool((idx == start + step * torch.arange(n, device=idx.device)).all()):
        return buffer[start : start + step * (n - 1) + 1 : step]
    return buffer[idx]


#: The open :func:`capture_sizes` lists of this thread or task (innermost last).
_SIZE_LISTENERS: contextvars.ContextVar[tuple[list[int], ...]] = contextvars.ContextVar(
    "hf_flowcheck_capture_sizes", default=()
)


@contextlib.contextmanager
def capture_sizes() -> Iterator[list[int]]:
    """Collect the buffer bytes of every :class:`FlowRecorder` closed inside the block.

    A diagnostic for memory benchmarks and tests: extraction and ``generate`` keep no record of
    their capture buffers, so a caller that wants the figure asks for it here. Scoped to the current
    thread (or asyncio task), so concurrent requests do not see each other's captures.

    Yields:
        A list that receives one int per recorder, in the order they closed.

    Example:
        >>> with capture_sizes() as sizes:   # doctest: +SKIP
        ...     extractor.extract(ids, response_mask=resp)
        >>> sizes[-1]
        4992
    """
    sizes: list[int] = []
    token = _SIZE_LISTENERS.set((*_SIZE_LISTENERS.get(), sizes))
    try:
        yield sizes
    finally:
        _SIZE_LISTENERS.reset(token)


def _hidden_from_args(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


def _first(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


class FlowRecorder:
    """Hooks that record the residual stream and both path outputs at every block.

    Args:
        arch: Resolved modules of the model.
        selector: Decides which ``(row, position)`` of each forward call to keep.
        capacity: Initial buffer size in kept positions (grows if needed).

    Example:
        >>> with FlowRecorder(arch, selector) as rec:   # doctest: +SKIP
        ...     model(input_ids)
        >>> states = rec.result()
    """

    def __init__(self, arch: ResolvedArchitecture, selector: Selector, capacity: int = 64) -> None:
        self.arch = arch
        self.selector = selector
        self._capacity = max(1, int(capacity))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._buf: dict[str, torch.Tensor] | None = None
        self._count = 0
        self._calls = 0
        self._cur: tuple[torch.Tensor, torch.Tensor, slice] | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> FlowRecorder:
        if self.arch.lock is not None:
            self.arch.lock.acquire()  # no other thread's forward passes while the hooks are on
        try:
            blocks = self.arch.blocks
            for b, block in enumerate(blocks):
                self._handles.append(block.register_forward_pre_hook(self._make_r_hook(b), with_kwargs=True))
                self._handles.append(self.arch.attn_modules[b].register_forward_hook(self._make_path_hook("o", b)))
                self._handles.append(self.arch.mlp_modules[b].register_forward_hook(self._make_path_hook("m", b)))
            final = self.arch.boundary_norms[-1]
            self._handles.append(final.register_forward_pre_hook(self._make_r_hook(len(blocks)), with_kwargs=True))
        except BaseException:
            self.remove()
            if self.arch.lock is not None:
                self.arch.lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
        if self.arch.lock is not None:
            self.arch.lock.release()
        for sizes in _SIZE_LISTENERS.get():
            sizes.append(self.nbytes)

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def nbytes(self) -> int:
        """Bytes held by the capture buffers (they hold only the selected positions)."""
        if self._buf is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._buf.values())

    @property
    def num_calls(self) -> int:
        """Forward calls seen so far."""
        return self._calls

    # --------------------------------------------------------------------------------- hooks
    def _ensure(self, need: int, dim: int, device: torch.device) -> None:
        n_blocks = self.arch.num_blocks
        if self._buf is None:
            cap = max(self._capacity, need)
            self._buf = {
                "r": torch.empty(cap, n_blocks + 1, dim, device=device),
                "o": torch.empty(cap, n_blocks, dim, device=device),
                "m": torch.empty(cap, n_blocks, dim, device=device),
                "rows": torch.empty(cap, dtype=torch.long, device=device),
                "pos": torch.empty(cap, dtype=torch.long, device=device),
            }
        elif self._count + need > self._buf["r"].shape[0]:
            cap = max(2 * self._buf["r"].shape[0], self._count + need)
            for key, t in self._buf.items():
                grown = t.new_empty((cap, *t.shape[1:]))
                grown[: self._count] = t[: self._count]
                self._buf[key] = grown

    def _begin_call(self, hidden: torch.Tensor) -> None:
        batch, seq = hidden.shape[0], hidden.shape[1]
        sel = self.selector(self._calls, batch, seq, hidden.device)
        if sel is None or sel[0].numel() == 0:
            self._cur = None
            return
        rows, cols, pos = (x.to(hidden.device) for x in sel)
        n = rows.numel()
        self._ensure(n, hidden.shape[-1], hidden.device)
        slots = slice(self._count, self._count + n)
        self._buf["rows"][slots] = rows
        self._buf["pos"][slots] = pos
        self._cur = (rows, cols, slots)

    def _store(self, key: str, b: int, x: torch.Tensor) -> None:
        if self._cur is None:
            return
        rows, cols, slots = self._cur
        self._buf[key][slots, b] = x[rows, cols].float()

    def _make_r_hook(self, b: int):
        last = b == self.arch.num_blocks

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            hidden = _hidden_from_args(args, kwargs)
            if b == 0:
                self._begin_call(hidden)
            self._store("r", b, hidden)
            if last:
                if self._cur is not None:
                    self._count = self._cur[2].stop
                self._cur = None
                self._calls += 1
            return None

        return hook

    def _make_path_hook(self, key: str, b: int):
        def hook(module: nn.Module, args: tuple, output):
            self._store(key, b, _first(output))
            return None

        return hook

    # -------------------------------------------------------------------------------- result
    def result(self) -> CapturedStates:
        """The captured states so far (views into the buffers)."""
        n = self._count
        if self._buf is None:
            dim = self.arch.readout.shape[1]
            dev = self.arch.readout.device
            nb = self.arch.num_blocks
            empty = torch.empty(0, dtype=torch.long, device=dev)
            return CapturedStates(
                torch.empty(0, nb + 1, dim, device=dev),
                torch.empty(0, nb, dim, device=dev),
                torch.empty(0, nb, dim, device=dev),
                empty,
                empty.clone(),
            )
        buf = self._buf
        return CapturedStates(buf["r"][:n], buf["o"][:n], buf["m"][:n], buf["rows"][:n], buf["pos"][:n])
