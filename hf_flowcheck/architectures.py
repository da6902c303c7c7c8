"""Where the pieces of each supported decoder live, as data.

An :class:`ArchitectureSpec` names, relative to the ``*ForCausalLM`` module, the list of blocks, the
final norm and, relative to one block, the block's input norm and the modules whose *outputs* are
what the attention path and the MLP path add to the residual stream (after any post-norm). With
these, ``r[b+1] = r[b] + o[b] + m[b]`` holds for every block (parallel residual blocks included);
``tests/test_architectures.py`` checks it for every entry on a tiny random model.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_flowcheck.errors import UnsupportedArchitectureError

__all__ = [
    "ArchitectureSpec",
    "ResolvedArchitecture",
    "UnsupportedArchitectureError",
    "get_architecture",
    "model_lock",
    "register_architecture",
    "resolve_architecture",
    "supported_architectures",
    "unwrap_model",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Module paths of one decoder family.

    Attributes:
        layers: Dotted path from the causal-LM module to the ``nn.ModuleList`` of blocks.
        final_norm: Dotted path to the norm applied after the last block (``N_B``).
        input_norm: Path inside a block to its input norm (``N_b``).
        attn_out: Path inside a block to the module whose output (first element if a tuple) is the
            attention path's contribution ``o[b]`` to the residual stream.
        mlp_out: Path inside a block to the module whose output is the MLP contribution ``m[b]``.
        notes: Free text shown in the supported-architecture listing.
    """

    layers: str
    final_norm: str
    input_norm: str
    attn_out: str
    mlp_out: str
    notes: str = field(default="", compare=False)


_LLAMA_LIKE = ArchitectureSpec(
    layers="model.layers",
    final_norm="model.norm",
    input_norm="input_layernorm",
    attn_out="self_attn",
    mlp_out="mlp",
    notes="pre-norm, sequential residual",
)
_GEMMA_LIKE = ArchitectureSpec(
    layers="model.layers",
    final_norm="model.norm",
    input_norm="input_layernorm",
    attn_out="post_attention_layernorm",
    mlp_out="post_feedforward_layernorm",
    notes="post-attention and post-feed-forward norms are part of the paths; 1+w RMSNorm",
)

_REGISTRY: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "phi3": ArchitectureSpec(
        layers="model.layers",
        final_norm="model.norm",
        input_norm="input_layernorm",
        attn_out="resid_attn_dropout",
        mlp_out="resid_mlp_dropout",
        notes="residual dropouts (identity in eval) carry the path outputs",
    ),
    "gemma2": _GEMMA_LIKE,
    "gemma3_text": _GEMMA_LIKE,
    "gpt2": ArchitectureSpec(
        layers="transformer.h",
        final_norm="transformer.ln_f",
        input_norm="ln_1",
        attn_out="attn",
        mlp_out="mlp",
        notes="LayerNorm with bias",
    ),
    "gpt_neox": ArchitectureSpec(
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        input_norm="input_layernorm",
        attn_out="post_attention_dropout",
        mlp_out="post_mlp_dropout",
        notes="parallel residual (use_parallel_residual=True) or sequential",
    ),
}


def supported_architectures() -> list[str]:
    """Sorted ``model_type`` names that have a registered spec."""
    return sorted(_REGISTRY)


def register_architecture(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Teach hf_flowcheck a new decoder family.

    Args:
        model_type: The ``config.model_type`` string of the family.
        spec: Module paths; see :class:`ArchitectureSpec`.
        overwrite: Replace an existing entry instead of raising.

    Example:
        >>> register_architecture("my_llama", ArchitectureSpec("model.layers", "model.norm",
        ...     "input_layernorm", "self_attn", "mlp"), overwrite=True)
    """
    if not isinstance(spec, ArchitectureSpec):
        raise TypeError(f"spec must be an ArchitectureSpec, got {type(spec).__name__}.")
    if model_type in _REGISTRY and not overwrite:
        raise ValueError(f"Architecture {model_type!r} is already registered; pass overwrite=True to replace it.")
    _REGISTRY[model_type] = spec


def get_architecture(model: nn.Module, override: ArchitectureSpec | None = None) -> ArchitectureSpec:
    """The spec for ``model`` (``override`` wins), or a helpful error."""
    if override is not None:
        return override
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise UnsupportedArchitectureError(
        f"hf_flowcheck does not know where the blocks of model_type={model_type!r} "
        f"({type(model).__name__}) are. Supported: {', '.join(supported_architectures())}. "
        "Register it once with\n"
        "    from hf_flowcheck import ArchitectureSpec, register_architecture\n"
        f"    register_architecture({model_type!r}, ArchitectureSpec(layers='model.layers', "
        "final_norm='model.norm', input_norm='input_layernorm', attn_out='self_attn', mlp_out='mlp'))\n"
        "or pass architecture=ArchitectureSpec(...) to FlowExtractor; "
        "tests/test_architectures.py shows how to check r[b+1] = r[b] + o[b] + m[b]."
    )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under PEFT/flow-checked wrappers."""
    seen = 0
    while hasattr(model, "get_base_model") and seen < 4:
        inner = model.get_base_model()
        if inner is model:
            break
        model = inner
        seen += 1
    return model


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that says which spec path is wrong."""
    try:
        return root.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"Path {path!r} does not exist in {type(root).__name__}: {exc}. "
            "The ArchitectureSpec for this model does not match its module tree; fix it with "
            "register_architecture(..., overwrite=True)."
        ) from exc


@dataclass
class ResolvedArchitecture:
    """The modules of one loaded model, resolved from its spec."""

    spec: ArchitectureSpec
    blocks: list[nn.Module]
    boundary_norms: list[nn.Module]  # N_0..N_B (B + 1 modules)
    attn_modules: list[nn.Module]
    mlp_modules: list[nn.Module]
    readout: torch.Tensor  # [V, d]
    #: The model's one re-entrant lock (:func:`model_lock`): hooks on it and every generate take it.
    lock: Any = field(default=None, repr=False, compare=False)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The one re-entrant lock of ``model`` (PEFT wrappers unwrapped), shared by every wrapper over it.

    Capture and clamp hooks sit on the model's shared modules, so a forward pass of another thread
    while they are on would be recorded (or clamped) as if it were this call's. Every hook owner
    (:class:`~hf_flowcheck.capture.FlowRecorder`, refinement) and every ``generate`` of a
    :class:`~hf_flowcheck.FlowCheckedModelForCausalLM`, plain or flow-checked, holds this lock, so
    calls from several threads run one after another and each gets the result it would get alone.
    """
    base = unwrap_model(model)
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(base)
        if lock is None:
            lock = _MODEL_LOCKS[base] = threading.RLock()
        return lock


def resolve_architecture(model: nn.Module, override: ArchitectureSpec | None = None) -> ResolvedArchitecture:
    """Find blocks, boundary norms, path modules and readout weight of ``model``."""
    model = unwrap_model(model)
    spec = get_architecture(model, override)
    layers = get_submodule(model, spec.layers)
    n_cfg = getattr(model.config, "num_hidden_layers", None)
    blocks = list(layers)[:n_cfg] if n_cfg else list(layers)
    norms = [get_submodule(b, spec.input_norm) for b in blocks] + [get_submodule(model, spec.final_norm)]
    attn = [get_submodule(b, spec.attn_out) for b in blocks]
    mlp = [get_submodule(b, spec.mlp_out) for b in blocks]
    out_emb = model.get_output_embeddings()
    if out_emb is None or not hasattr(out_emb, "weight"):
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no output embedding (readout) weight.")
    return ResolvedArchitecture(spec, blocks, norms, attn, mlp, out_emb.weight, model_lock(model))
