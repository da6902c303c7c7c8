"""What every part of the package asks a transformers model the same way: pad and end ids, the input
device, and the keyword arguments of a plain forward pass. One owner for each of these facts."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import unwrap_model

__all__ = [
    "accepts",
    "as_token_ids",
    "cache_keyword",
    "eos_token_ids",
    "forward_kwargs",
    "input_device",
    "output_cache_field",
    "pad_token_id",
]

_ACCEPTS_CACHE: dict[tuple[type, str], bool] = {}


def accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes the keyword ``name`` (cached per class)."""
    key = (type(model), name)
    if key not in _ACCEPTS_CACHE:
        try:
            # An explicit parameter only: a name swallowed by **kwargs may reach a module that rejects it.
            ok = name in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            ok = False
        _ACCEPTS_CACHE[key] = ok
    return _ACCEPTS_CACHE[key]


def cache_keyword(model: nn.Module) -> str:
    """The keyword that hands a KV cache to ``model`` (and its ``generate``): ``cache`` where the model's
    ``forward`` takes it (transformers >= 5.2x deprecates ``past_key_values``), else ``past_key_values``."""
    return "cache" if accepts(unwrap_model(model), "cache") else "past_key_values"


def output_cache_field(output: Any) -> str:
    """The field of a ``generate`` output that holds its KV cache: ``cache`` where the output class
    declares it (transformers >= 5.2x; reading ``past_key_values`` there logs a deprecation), else
    ``past_key_values``."""
    return "cache" if "cache" in getattr(output, "__dataclass_fields__", {}) else "past_key_values"


def input_device(model: nn.Module) -> torch.device:
    """Where ``input_ids`` go: the device of the input embeddings (also under ``device_map``)."""
    return unwrap_model(model).get_input_embeddings().weight.device


def as_token_ids(value: Any) -> list[int]:
    """Token ids of an ``int | list[int] | None`` config value."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def eos_token_ids(model: nn.Module, tokenizer: Any = None) -> set[int]:
    """Every end-of-sequence id of the generation config, the model config and the tokenizer."""
    base = unwrap_model(model)
    ids: set[int] = set()
    for src in (getattr(base, "generation_config", None), getattr(base, "config", None), tokenizer):
        ids.update(as_token_ids(getattr(src, "eos_token_id", None) if src is not None else None))
    return ids


def pad_token_id(
    model: nn.Module, tokenizer: Any = None, *, eos_fallback: bool = False, default: int | None = None
) -> int | None:
    """The pad id of the generation config, the model config or the tokenizer (in that order).

    Args:
        model: A transformers model (PEFT-wrapped models are unwrapped).
        tokenizer: Optional tokenizer, asked last.
        eos_fallback: Without a pad id, return the first end-of-sequence id (what ``generate`` pads
            finished rows with).
        default: Returned when nothing is found (batching needs some id under an attention mask).
    """
    base = unwrap_model(model)
    sources = (getattr(base, "generation_config", None), getattr(base, "config", None), tokenizer)
    for src in sources:
        found = as_token_ids(getattr(src, "pad_token_id", None) if src is not None else None)
        if found:
            return found[0]
    if eos_fallback:
        for src in sources:
            found = as_token_ids(getattr(src, "eos_token_id", None) if src is not None else None)
            if found:
                return found[0]
    return default


def forward_kwargs(model: nn.Module, attention_mask: torch.Tensor, *, logits_to_keep: int = 1) -> dict[str, Any]:
    """Keyword arguments of a cache-free forward over left- or right-padded rows.

    Position ids count real tokens only (as ``generate`` does for left padding), and only the last
    ``logits_to_keep`` positions get logits where the model supports it.

    Args:
        model: The module whose ``forward`` is called (its signature decides what is passed).
        attention_mask: ``[N, S]``.
        logits_to_keep: Positions at the end that need logits (``0``: all, as transformers reads it).
    """
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    base = unwrap_model(model)
    if accepts(base, "position_ids"):
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    if accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = logits_to_keep
    return kwargs
