"""Validators shipped inside the package, and how a base model finds its default one."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["VALIDATORS_DIR", "bundled_validators", "default_validator_for"]

VALIDATORS_DIR = Path(__file__).parent / "validators"


def bundled_validators() -> dict[str, Path]:
    """Name → folder of every bundled validator (folders holding a ``config.json``)."""
    if not VALIDATORS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(VALIDATORS_DIR.iterdir()) if (p / "config.json").is_file()}


def _fingerprint(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    return cfg.get("base_fingerprint") or {}


def _preference(folder: Path) -> tuple[int, str]:
    """Validators trained on more prompt styles first (they hold where people prompt), then by name."""
    meta = json.loads((folder / "config.json").read_text()).get("training_metadata") or {}
    return -len(meta.get("prompt_styles") or ()), folder.name


def default_validator_for(model: nn.Module, name: str | None = None) -> Any:
    """The bundled validator trained on ``model``, or ``None`` when there is none.

    A validator matches when the model's architecture, sizes and readout-weight hash equal its
    recorded base-model fingerprint, whatever name or path the model was loaded from. When several
    match, the one trained on the most prompt styles (``training_metadata["prompt_styles"]``) wins.
    """
    from hf_flowcheck.fingerprint import model_fingerprint

    candidates = bundled_validators()
    if not candidates:
        return None
    fp = None
    for folder in sorted(candidates.values(), key=_preference):
        want = _fingerprint(folder)
        cfg = getattr(model, "config", None)
        if want.get("num_blocks") != getattr(cfg, "num_hidden_layers", None):
            continue
        if want.get("hidden_size") != getattr(cfg, "hidden_size", None):
            continue
        if fp is None:
            fp = model_fingerprint(model)
        if want.get("readout_sha256") == fp.get("readout_sha256"):
            from hf_flowcheck.detectors.flow_validator import FlowValidator

            return FlowValidator.from_pretrained(str(folder))
        dtype = getattr(getattr(model, "get_output_embeddings", lambda: None)(), "weight", None)
        if dtype is not None and dtype.dtype in (torch.bfloat16, torch.float16):
            warnings.warn(
                f"The bundled validator {folder.name!r} has this model's shape but was fingerprinted on float32 "
                f"weights, and this model is loaded in {str(dtype.dtype).removeprefix('torch.')}, so it is not "
                "loaded. Load the model with dtype=torch.float32 (flowcheck: --dtype float32) to use it.",
                stacklevel=2,
            )
    return None
