"""The gradient signature: sketched weight gradients of each block's linear maps (no optimizer step)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import resolve_architecture, unwrap_model
from hf_flowcheck.detectors.base import ScoredExample
from hf_flowcheck.detectors.gradient.config import GradientConfig
from hf_flowcheck.errors import GradientSignatureError
from hf_flowcheck.model_io import accepts, input_device

__all__ = ["gradient_signature", "gradient_signatures", "sketch_matrix", "sketch_weight_gradient"]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and any(True for _ in m.parameters(recurse=False))


@dataclass
class _Linear:
    name: str
    module: nn.Module
    in_features: int
    out_features: int


@dataclass
class _BlockPlan:
    index: int
    module: nn.Module
    norm_params: list[tuple[str, nn.Parameter]]
    linears: list[_Linear]

    def dim(self, sketch: int | None) -> int:
        n = sum(p.numel() for _, p in self.norm_params)
        if sketch is None:
            return n + sum(lin.in_features * lin.out_features for lin in self.linears)
        return n + len(self.linears) * sketch * sketch


def _linear_dims(m: nn.Module) -> tuple[int, int]:
    w = m.weight
    if isinstance(m, nn.Linear):
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w.shape[1])  # transformers Conv1D: weight [in, out]


def _block_plan(index: int, block: nn.Module) -> _BlockPlan:
    norms: list[tuple[str, nn.Parameter]] = []
    linears: list[_Linear] = []
    for name, m in block.named_modules():
        if _is_linear(m):
            i, o = _linear_dims(m)
            linears.append(_Linear(name, m, i, o))
        elif _is_norm(m):
            norms.extend((f"{name}.{pn}", p) for pn, p in m.named_parameters(recurse=False))
    return _BlockPlan(index, block, norms, linears)


_PROJ_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_PROJ_CACHE_MAX = 4096


def _projection(seed: int, block: int, name: str, which: str, k: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed Gaussian ``[k, dim]`` with entries ``N(0, 1/k)``, a function of ``(seed, block, name, which)``."""
    key = (seed, block, name, which, k, dim, str(device))
    hit = _PROJ_CACHE.get(key)
    if hit is not None:
        return hit
    digest = hashlib.sha256(f"{seed}\x00{block}\x00{name}\x00{which}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    mat = (torch.randn(k, dim, generator=gen, dtype=torch.float32) / math.sqrt(k)).to(device)
    if len(_PROJ_CACHE) >= _PROJ_CACHE_MAX:
        _PROJ_CACHE.pop(next(iter(_PROJ_CACHE)))
    _PROJ_CACHE[key] = mat
    return mat


def sketch_matrix(k: int, dim: int, *, seed: int = 0, block: int = 0, name: str = "", which: str = "P") -> torch.Tensor:
    """The fixed Gaussian sketch used for one side of one linear weight.

    Args:
        k: Sketch rows (``GradientConfig.sketch``).
        dim: Side length (``out_features`` for ``P``, ``in_features`` for ``Q``).
        seed: ``GradientConfig.seed``.
        block: Block index of the linear.
        name: The linear's module path inside its block (e.g. ``"mlp.down_proj"``).
        which: ``"P"`` (output side) or ``"Q"`` (input side).

    Returns:
        ``float32 [k, dim]`` (CPU) with i.i.d. ``N(0, 1/k)`` entries, so ``E[PᵀP] = I``.
    """
    if which not in ("P", "Q"):
        raise ValueError(f"which={which!r} must be 'P' or 'Q'.")
    return _projection(seed, block, name, which, k, dim, torch.device("cpu")).clone()


def sketch_weight_gradient(
    x: torch.Tensor, delta: torch.Tensor, p: torch.Tensor | None = None, q: torch.Tensor | None = None
) -> torch.Tensor:
    """Sketch ``S = Σ_t (P δ_t)(Q x_t)ᵀ = P G Qᵀ`` of a linear weight's gradient ``G = Σ_t δ_t x_tᵀ``.

    The reference math of what :func:`gradient_signature` computes with hooks (``Q x_t`` in the
    forward hook, ``P δ_t`` in the backward hook), never forming ``G`` when ``P`` and ``Q`` are given.

    Args:
        x: ``[T, in]`` input activations of the linear.
        delta: ``[T, out]`` gradients of the loss with respect to its outputs.
        p: ``[k, out]`` output-side sketch, or ``None`` (no sketch on that side).
        q: ``[k, in]`` input-side sketch, or ``None``.

    Returns:
        ``[k, k]`` (both sketches), or ``G`` ``[out, in]`` when both are ``None``.
    """
    left = delta if p is None else delta @ p.T
    right = x if q is None else x @ q.T
    return left.T @ right


def _plans(model: nn.Module, indices: Sequence[int] | None = None) -> list[_BlockPlan]:
    """Norm parameters and linear modules of the blocks (rebuilt per call: adapters may have changed them)."""
    blocks = resolve_architecture(unwrap_model(model)).blocks
    idx = range(len(blocks)) if indices is None else indices
    return [_block_plan(i, blocks[i]) for i in idx]


def _num_blocks(model: nn.Module) -> int:
    return resolve_architecture(unwrap_model(model)).num_blocks


def _as_batch(
    t: torch.Tensor | Sequence[int] | None, name: str, like: torch.Tensor | None = None
) -> torch.Tensor | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] != 1:
        raise ValueError(
            f"{name} must be [S] or [1, S] (one sample per signature; use gradient_signatures() for many), "
            f"got shape {tuple(t.shape)}."
        )
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(like.shape)}.")
    return t


def gradient_signature(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    answer_mask: torch.Tensor,
    config: GradientConfig | None = None,
) -> torch.Tensor:
    """Gradient signature of one (prompt, answer) sequence: one forward-backward pass.

    Args:
        model: A transformers causal LM of a supported architecture (PEFT wrappers are unwrapped).
            Use it in eval mode (dropout would make the signature random).
        input_ids: ``[S]`` or ``[1, S]`` prompt followed by the answer.
        attention_mask: ``[S]``/``[1, S]`` (1 = real token) or ``None`` (all real).
        answer_mask: ``[S]``/``[1, S]``, 1 on the answer tokens; the loss is their mean NLL given
            everything before them (position 0 cannot be predicted and is ignored).
        config: :class:`GradientConfig` (``layers``, ``sketch``, ``seed`` are used here).

    Returns:
        ``float32 [L_sel, D]`` on the model's device: row ``i`` is the gradient of selected block
        ``i`` (sorted block order): its norm parameters' gradients, then each linear weight's
        sketch ``S = P G Qᵀ`` (``[k, k]``, row-major; ``G`` as ``[out, in]``) or, with
        ``sketch=None``, ``G`` itself. Blocks with fewer entries are zero-padded to ``D``.

    Raises:
        ValueError: No answer token, or bad shapes.
        GradientSignatureError: The blocks have no backward in the model's dtype (e.g. float16 on
            CPU), the gradients are not finite, or inference mode is on.
    """
    cfg = config or GradientConfig()
    if torch.is_inference_mode_enabled():
        raise GradientSignatureError(
            "gradient_signature() needs autograd, but torch.inference_mode() is active; call it outside "
            "inference_mode (torch.no_grad() around it is fine: gradients are enabled inside)."
        )
    ids = _as_batch(input_ids, "input_ids")
    assert ids is not None
    att = _as_batch(attention_mask, "attention_mask", ids)
    ans = _as_batch(answer_mask, "answer_mask", ids)
    if ans is None:
        raise ValueError("answer_mask is required: 1 on the answer tokens whose NLL is the loss.")
    att = torch.ones_like(ids) if att is None else att
    targets = (ans[0] != 0) & (att[0] != 0)
    targets[0] = False
    pos = targets.nonzero().flatten()
    if pos.numel() == 0:
        raise ValueError(
            "answer_mask marks no predictable answer token (an empty answer, or only position 0); the loss is the "
            "mean NLL of the answer tokens, so give at least one answer token after the prompt."
        )
    base = unwrap_model(model)
    selected = _plans(base, cfg.select_blocks(_num_blocks(base)))
    device = input_device(base)
    ids, att = ids.to(device), att.to(device)
    pos = pos.to(device)
    seq = ids.shape[1]
    first = int(pos[0]) - 1  # first position whose logits are needed

    params = list(base.parameters())
    saved_rg = [p.requires_grad for p in params]
    norm_params = [p for plan in selected for _, p in plan.norm_params]
    k = cfg.sketch
    acc: dict[tuple[int, int], torch.Tensor] = {}
    handles: list[Any] = []
    entry: dict[str, torch.Tensor] = {}
    valid = att[0].to(torch.float32).view(-1, 1)

    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            h = args[0].detach().requires_grad_(True)
            entry["x"] = h
            return (h, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            h = kwargs["hidden_states"].detach().requires_grad_(True)
            entry["x"] = h
            return args, {**kwargs, "hidden_states": h}
        return None

    def make_hook(b: int, j: int, lin: _Linear) -> Callable[..., None]:
        def fwd_hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach().reshape(-1, lin.in_features).to(torch.float32)
            if x.shape[0] == valid.shape[0]:
                x = x * valid
            # [T, in] exact, or [T, k] sketched
            right = x if k is None else x @ _projection(cfg.seed, b, lin.name, "Q", k, lin.in_features, x.device).T

            def grad_hook(g: torch.Tensor) -> None:
                d = g.detach().reshape(-1, lin.out_features).to(torch.float32)
                left = d if k is None else d @ _projection(cfg.seed, b, lin.name, "P", k, lin.out_features, d.device).T
                contrib = left.T @ right  # [out|k, in|k]
                key = (b, j)
                acc[key] = contrib if key not in acc else acc[key] + contrib

            output.register_hook(grad_hook)

        return fwd_hook

    dtype = next(iter(base.parameters())).dtype
    try:
        for p in params:
            p.requires_grad_(False)
        for p in norm_params:
            p.requires_grad_(True)
        handles.append(selected[0].module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for plan in selected:
            for j, lin in enumerate(plan.linears):
                handles.append(lin.module.register_forward_hook(make_hook(plan.index, j, lin)))
        kwargs: dict[str, Any] = {"attention_mask": att, "use_cache": False}
        if accepts(base, "position_ids"):
            kwargs["position_ids"] = (att.long().cumsum(-1) - 1).clamp_min(0)
        keep = seq - first
        if accepts(base, "logits_to_keep"):
            kwargs["logits_to_keep"] = keep
        try:
            with torch.enable_grad():
                out = base(input_ids=ids, **kwargs)
                logits = out.logits[0]
                logits = logits[-keep:] if logits.shape[0] >= keep else logits
                offset = seq - logits.shape[0]
                rows = pos - 1 - offset
                logp = torch.log_softmax(logits[rows].float(), dim=-1)
                loss = -logp.gather(-1, ids[0, pos].unsqueeze(-1)).mean()
                if "x" not in entry:
                    raise GradientSignatureError(
                        f"The first selected block (index {selected[0].index}) was not called with the hidden states "
                        "as its first argument or as hidden_states=, so the backward cannot be stopped there; "
                        "this architecture's blocks are called in an unsupported way."
                    )
                grads = torch.autograd.grad(loss, [entry["x"], *norm_params], allow_unused=True)
        except RuntimeError as err:
            if dtype in (torch.float16, torch.bfloat16):
                raise GradientSignatureError(
                    f"The backward pass through the selected blocks failed in {dtype} on {device.type} "
                    f"({str(err).strip().splitlines()[0]}). Load the model in float32 "
                    "(from_pretrained(..., dtype=torch.float32)) to compute gradient signatures."
                ) from err
            raise
    finally:
        for h in handles:
            h.remove()
        for p, rg in zip(params, saved_rg):
            p.requires_grad_(rg)

    norm_grads = grads[1:]
    rows_out: list[torch.Tensor] = []
    gi = 0
    for plan in selected:
        parts = []
        for _, p in plan.norm_params:
            g = norm_grads[gi]
            gi += 1
            parts.append((torch.zeros_like(p) if g is None else g).detach().reshape(-1).to(torch.float32))
        for j, lin in enumerate(plan.linears):
            shape = (lin.out_features, lin.in_features) if k is None else (k, k)
            s = acc.get((plan.index, j))
            parts.append(torch.zeros(shape, device=device).reshape(-1) if s is None else s.reshape(-1).to(device))
        rows_out.append(torch.cat(parts) if parts else torch.zeros(0, device=device))
    width = max(r.numel() for r in rows_out)
    sig = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows_out])
    if not bool(torch.isfinite(sig).all()):
        raise GradientSignatureError(
            f"The gradient signature holds NaN/inf (model dtype {dtype}); the backward overflowed. Load the model in "
            "float32 (from_pretrained(..., dtype=torch.float32))."
        )
    return sig


def gradient_signatures(
    model: nn.Module,
    examples: Sequence[ScoredExample],
    config: GradientConfig | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Gradient signatures of many examples (one forward-backward pass each).

    Args:
        model: The base causal LM.
        examples: ``N`` :class:`~hf_flowcheck.detectors.base.ScoredExample`.
        config: See :func:`gradient_signature`.
        progress: Optional ``callback(done, total)``.

    Returns:
        ``float32 [N, L_sel, D]`` on the CPU.
    """
    out = []
    for i, ex in enumerate(examples):
        ids = torch.tensor([ex.input_ids], dtype=torch.long)
        ans = torch.zeros_like(ids)
        ans[0, len(ex.prompt_ids) :] = 1
        out.append(gradient_signature(model, ids, None, ans, config).cpu())
        if progress is not None:
            progress(i + 1, len(examples))
    if not out:
        raise ValueError("gradient_signatures() got no examples.")
    width = max(s.shape[1] for s in out)
    return torch.stack([torch.nn.functional.pad(s, (0, width - s.shape[1])) for s in out])
