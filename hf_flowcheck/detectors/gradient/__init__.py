"""Gradient signatures ("Grad Detect", design ``gradient-signatures.md``) and the detector reading them.

One forward-backward pass per (prompt, answer): the loss is the mean negative log-likelihood of
the answer tokens given the prompt, teacher-forced on the model's own answer, so no label is
needed at inference. The backward pass stops at the residual stream entering the first selected
block (the last ``layers=5`` blocks by default): that tensor is detached, only the selected
blocks' norm parameters require grad for the duration, and gradients are taken with
:func:`torch.autograd.grad` -- nothing is left in ``.grad`` and every parameter's
``requires_grad`` is restored in ``finally``.

The gradient of a block is the gradients of its norm parameters, concatenated with a seeded
low-rank sketch of each linear weight's gradient. For a linear map with input activations
``x_t`` and output gradients ``δ_t`` (``t`` over the positions), the weight gradient is
``G = Σ_t δ_t x_tᵀ``; its sketch ``S = Σ_t (P δ_t)(Q x_t)ᵀ = P G Qᵀ`` uses fixed Gaussian
``P [k, out]``, ``Q [k, in]`` with entries ``N(0, 1/k)`` (``k = sketch``), so that
``E[<S₁, S₂>] = <G₁, G₂>``: inner products -- hence cosine similarities -- are preserved in
expectation, and ``G`` is never formed (``Q x_t`` is kept in the forward hook, ``P δ_t`` is
computed in a tensor hook on the output). ``sketch=None`` gives the exact ``G`` (small models).

:class:`GradientDetector` keeps one reference gradient per class and layer (the mean of the
training signatures of that class), turns each layer into ``[cos(g_b, ref_c,b) for c] +
[log ‖g_b‖]`` and reads the sequence of layers with a small transformer encoder (or logistic
regression) into class logits. ``score`` is the probability of the hallucinated class: **in
[0, 1], higher = more likely hallucinated**.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=4,
    ...     num_attention_heads=4, intermediate_size=37)).eval()
    >>> ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    >>> answer = torch.tensor([[0, 0, 0, 1, 1, 1]])
    >>> sig = gradient_signature(lm, ids, None, answer, GradientConfig(layers=2, sketch=4))
    >>> tuple(sig.shape)  # 2 blocks x (2 norms x 32 + 7 linears x 4 x 4)
    (2, 176)
"""

from __future__ import annotations

from hf_flowcheck.detectors.gradient.config import ABSTENTION_PATTERNS, CLASS_NAMES, GradientConfig
from hf_flowcheck.detectors.gradient.detector import GradientDetector
from hf_flowcheck.detectors.gradient.labels import abstention_labels, is_abstention
from hf_flowcheck.detectors.gradient.reader import signature_features
from hf_flowcheck.detectors.gradient.signature import (
    gradient_signature,
    gradient_signatures,
    sketch_matrix,
    sketch_weight_gradient,
)
from hf_flowcheck.errors import GradientSignatureError

__all__ = [
    "ABSTENTION_PATTERNS",
    "CLASS_NAMES",
    "GradientConfig",
    "GradientDetector",
    "GradientSignatureError",
    "abstention_labels",
    "gradient_signature",
    "gradient_signatures",
    "is_abstention",
    "signature_features",
    "sketch_matrix",
    "sketch_weight_gradient",
]
