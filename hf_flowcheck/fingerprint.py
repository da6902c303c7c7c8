"""Base-model fingerprints: what a saved detector was trained on, and the check that refuses another model.

Flow signatures are read through one base model's blocks and readout, so a detector trained on one
model means nothing on another (a different checkpoint, a fine-tune, a model with fewer layers).
Every saved detector stores :func:`model_fingerprint` of its base model; :func:`check_fingerprint`
compares it with the model at hand and raises :class:`FingerprintMismatchError` naming each field
that differs (as tuned-lens does with its readout hash).

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
    ...     num_attention_heads=4, intermediate_size=37))
    >>> fp = model_fingerprint(lm)
    >>> fp["num_blocks"], fp["hidden_size"], fp["vocab_size"]
    (2, 32, 99)
    >>> check_fingerprint(fp, lm)  # same model: passes silently
"""

from __future__ import annotations

import hashlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hf_flowcheck.architectures import resolve_architecture, unwrap_model
from hf_flowcheck.errors import FingerprintMismatchError

__all__ = [
    "CHECKED_FIELDS",
    "FINGERPRINT_FIELDS",
    "FingerprintMismatchError",
    "check_fingerprint",
    "model_fingerprint",
    "readout_sha256",
]

#: Every key of a fingerprint, in a fixed order.
FINGERPRINT_FIELDS: tuple[str, ...] = (
    "model_type",
    "num_blocks",
    "hidden_size",
    "vocab_size",
    "readout_sha256",
    "base_id",
    "revision",
)
#: Fields compared by :func:`check_fingerprint` by default. ``base_id`` and ``revision`` are kept
#: for people (the same weights may be loaded from a Hub id or a local folder); the readout hash
#: already identifies the weights.
CHECKED_FIELDS: tuple[str, ...] = ("model_type", "num_blocks", "hidden_size", "vocab_size", "readout_sha256")

# Rows hashed per chunk: bounds the float32 copy to ~chunk*d*4 bytes even for large vocabularies.
_CHUNK_ROWS = 8192
_HASH_CACHE: OrderedDict[int, tuple[weakref.ref, tuple[Any, ...], str]] = OrderedDict()
_HASH_CACHE_SIZE = 16


def readout_sha256(weight: torch.Tensor, *, cache: bool = True) -> str:
    """SHA-256 of a readout weight's values as little-endian float32 bytes.

    The weight is copied to the CPU in chunks of rows, so the peak extra memory is small. Results
    are cached per tensor object (checked against its data pointer, shape, dtype, device and in-place
    version counter), so repeated checks against the same loaded model are free. Edits through
    ``weight.data`` bypass the version counter; pass ``cache=False`` after such edits.

    Args:
        weight: ``[V, d]`` readout (unembedding) weight, any dtype and device.
        cache: Use and fill the cache.

    Returns:
        The hex digest (64 characters).

    Raises:
        ValueError: If the weight lives on the ``meta`` device (not materialised).
    """
    if weight.device.type == "meta":
        raise ValueError(
            "The readout weight is on the 'meta' device (not loaded), so it cannot be fingerprinted. "
            "Load the model's weights (e.g. without low_cpu_mem_usage/empty-weights tricks) before checking."
        )
    # Keyed by the tensor object itself (a weak reference), never by address alone: a freed weight's
    # address may be reused by another model's readout.
    meta = (weight.data_ptr(), tuple(weight.shape), str(weight.dtype), str(weight.device), weight._version)
    entry = _HASH_CACHE.get(id(weight))
    if cache and entry is not None and entry[0]() is weight and entry[1] == meta:
        _HASH_CACHE.move_to_end(id(weight))
        return entry[2]
    h = hashlib.sha256()
    w = weight.detach()
    if w.dim() == 1:
        w = w[:, None]
    w = w.reshape(w.shape[0], -1)
    for start in range(0, w.shape[0], _CHUNK_ROWS):
        chunk = w[start : start + _CHUNK_ROWS].to(device="cpu", dtype=torch.float32).contiguous()
        h.update(chunk.numpy().astype("<f4", copy=False).tobytes())
    digest = h.hexdigest()
    if not cache:
        return digest
    _HASH_CACHE[id(weight)] = (weakref.ref(weight), meta, digest)
    _HASH_CACHE.move_to_end(id(weight))
    while len(_HASH_CACHE) > _HASH_CACHE_SIZE:
        _HASH_CACHE.popitem(last=False)
    return digest


def _upstream_id(name_or_path: str | None) -> str | None:
    """The upstream Hub id of an offline-converted model folder (its source record says), else as given."""
    if not name_or_path:
        return name_or_path
    import json
    from pathlib import Path

    from hf_flowcheck.offline_models import SOURCE_FILENAME

    source = Path(name_or_path) / SOURCE_FILENAME
    if source.is_file():
        try:
            return json.loads(source.read_text()).get("hub_id") or name_or_path
        except (OSError, ValueError):
            return name_or_path
    return name_or_path


def model_fingerprint(model: nn.Module, base_id: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """What identifies a base model for a flow detector.

    Args:
        model: A transformers causal LM (PEFT or flow-checked wrappers are unwrapped).
        base_id: Hub id or path to record; defaults to ``model.config._name_or_path``.
        revision: Revision to record; defaults to ``model.config._commit_hash`` when set.

    Returns:
        A JSON-serialisable dict with ``model_type``, ``num_blocks``, ``hidden_size`` and
        ``vocab_size`` (the readout's ``[V, d]`` shape), ``readout_sha256`` (see
        :func:`readout_sha256`), ``base_id`` and ``revision`` (``None`` when unknown).
    """
    arch = resolve_architecture(model)
    base = unwrap_model(model)
    cfg = getattr(base, "config", None)
    readout = arch.readout
    if base_id is None:
        base_id = _upstream_id(getattr(cfg, "_name_or_path", None) or None)
    if revision is None:
        revision = getattr(cfg, "_commit_hash", None) or None
    return {
        "model_type": getattr(cfg, "model_type", None),
        "num_blocks": int(arch.num_blocks),
        "hidden_size": int(readout.shape[1]),
        "vocab_size": int(readout.shape[0]),
        "readout_sha256": readout_sha256(readout),
        "base_id": None if base_id is None else str(base_id),
        "revision": None if revision is None else str(revision),
    }


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "...'"


def check_fingerprint(
    expected: Mapping[str, Any], model: nn.Module, *, fields: Iterable[str] = CHECKED_FIELDS, what: str = "detector"
) -> None:
    """Raise unless ``model`` matches the fingerprint a detector was trained with.

    Args:
        expected: A :func:`model_fingerprint` dict (as stored in a detector's ``config.json``).
        model: The base model the detector is about to be used with.
        fields: Fields to compare (default :data:`CHECKED_FIELDS`). Fields missing from
            ``expected`` are not compared.
        what: Name of the artifact in the error message.

    Raises:
        FingerprintMismatchError: Naming every differing field with both values, and the fix.
        ValueError: If ``fields`` names an unknown field.
    """
    fields = tuple(fields)
    unknown = sorted(set(fields) - set(FINGERPRINT_FIELDS))
    if unknown:
        raise ValueError(f"Unknown fingerprint field(s) {unknown}; known fields: {list(FINGERPRINT_FIELDS)}.")
    if not isinstance(expected, Mapping):
        raise ValueError(
            f"expected must be a fingerprint dict from model_fingerprint(), got {type(expected).__name__}."
        )
    actual = model_fingerprint(model)
    diffs = [
        (name, expected[name], actual[name])
        for name in fields
        if name in expected and expected[name] is not None and expected[name] != actual[name]
    ]
    if not diffs:
        return
    lines = "; ".join(f"{name} differs (trained on {_short(exp)}, got {_short(got)})" for name, exp, got in diffs)
    dtype = resolve_architecture(model).readout.dtype
    if [d[0] for d in diffs] == ["readout_sha256"] and dtype in (torch.bfloat16, torch.float16):
        # The hash is of the weights as loaded: a half-precision copy of the right model hashes differently,
        # and which model it was rounded from cannot be told apart from another model. Refuse, and say why.
        raise FingerprintMismatchError(
            f"This {what}'s readout fingerprint does not match the model given, which holds its readout in "
            f"{str(dtype).removeprefix('torch.')}: fingerprints hash the weights as loaded, so a half-precision copy "
            "of the right model cannot be told apart from another model. "
            "Load the base model with dtype=torch.float32 (from_pretrained(..., dtype=torch.float32)) to check and run "
            f"the {what}, or pass check_compatibility=False if you know it is the same model in lower precision "
            "(scores then come from rounded states)."
        )
    trained_on = expected.get("base_id") or "an unnamed model"
    rev = f" at revision {expected['revision']}" if expected.get("revision") else ""
    raise FingerprintMismatchError(
        f"This {what} was trained on {trained_on!r}{rev}, not on the model given "
        f"({actual.get('base_id') or type(unwrap_model(model)).__name__!r}): {lines}. Flow signatures are "
        f"specific to one base model's blocks and readout weights, so scores on another model are meaningless. "
        f"Load the base model the {what} was trained on, or train a {what} for this model "
        f"(hf_flowcheck.workflows.training.train_validator)."
    )
