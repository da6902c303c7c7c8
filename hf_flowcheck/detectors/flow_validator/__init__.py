"""The flow validator (spec ``flow-signatures.md`` §6, paper B.9): events in, one sample score out.

Three heads share the event encoder. ``head="gru"`` is the spec's B.9, described below.
``head="attention"`` scores each event on its own and takes the attention-weighted mean of the
event logits as the sample logit (every event gets gradient). ``head="depth"`` is a depth-summary
model: per block, the mean and maximum of the event embeddings over the answer's tokens and the
largest event logit, a 1-D convolution over depth, one logit per block, their mean as the sample
logit (the culprit is the block with the largest logit and, in it, the token with the largest event
logit). Every head can read its inputs scaled per (block, feature), a block embedding, the
readout-lens channels and, in a *flow + state* validator, a residual-state summary of the answer
(:class:`ValidatorConfig`).

Events are the valid ``(b, t)`` cells of a :class:`~hf_flowcheck.extraction.FlowFeatures` tensor,
read depth-major (every masked token of block 0, then block 1, ...). Each event's feature vector
goes through ``LayerNorm(F) → MLP (F→256→128, GELU, dropout) → LayerNorm → GRU(128→256) →
Linear(256→1)``; the per-event logits are pooled over the valid events (``max`` by default, or
``logsumexp``) into the sample logit. ``sigmoid(logit)`` is the score: **in [0, 1], higher = more
likely hallucinated**. The *culprit* ``(t0, b0)`` that refinement patches is the riskiest token
(the largest token logit, :class:`FlowValidatorOutput`) at the block of its largest event logit;
the depth head's is its own (above).

Padding never reaches the GRU: the valid events of each row are compacted to the front (a stable
sort keeps their depth-major order) before the recurrence, and the per-event logits are scattered
back to ``[N, B, T]`` afterwards. A row's score therefore does not depend on the other rows of the
batch nor on how many padding columns ``T`` carries.

Saved with :meth:`FlowValidator.save_pretrained` / :meth:`~FlowValidator.push_to_hub`
(``huggingface_hub.PyTorchModelHubMixin``) as ``config.json`` (the :class:`ValidatorConfig`, the
``FlowConfig`` the features were computed with, the base-model fingerprint, version stamps and
training metadata), ``model.safetensors`` (loaded strictly) and a generated ``README.md``.

Example:
    >>> import torch
    >>> v = FlowValidator(ValidatorConfig(num_features=10, hidden=16, embed=8, gru_hidden=8))
    >>> values, valid = torch.randn(2, 4, 3, 10), torch.ones(2, 4, 3, dtype=torch.bool)
    >>> out = v.eval()(values, valid)
    >>> tuple(out.scores.shape), tuple(out.event_logits.shape)
    ((2,), (2, 4, 3))
"""

from __future__ import annotations

from hf_flowcheck.detectors.checkpoint import CheckpointError
from hf_flowcheck.detectors.flow_validator.config import HEADS, INPUT_TRANSFORMS, POOLINGS, SIZE_BOUNDS, ValidatorConfig
from hf_flowcheck.detectors.flow_validator.model import FlowValidator
from hf_flowcheck.detectors.flow_validator.output import FlowValidatorOutput

__all__ = [
    "HEADS",
    "INPUT_TRANSFORMS",
    "POOLINGS",
    "SIZE_BOUNDS",
    "CheckpointError",
    "FlowValidator",
    "FlowValidatorOutput",
    "ValidatorConfig",
]
