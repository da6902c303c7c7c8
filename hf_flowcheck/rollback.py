"""The in-call rollback of ``generate(..., flow_rollback_threshold=...)``: a running check stops the rows that
cross the threshold, :func:`~hf_flowcheck.refinement.refine` rolls each back to its culprit under the
block clamp, and every flow field is recomputed for the returned sequences.

It sits below the wrapper (``modeling.py`` only delegates) and above :mod:`hf_flowcheck.refinement`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.generation import FlowGenerateOutput, attach_scores, flow_generate
from hf_flowcheck.model_io import output_cache_field
from hf_flowcheck.refine_config import RefineConfig, check_rollback_decoding
from hf_flowcheck.refinement import refine

__all__ = ["generate_with_rollback"]


def generate_with_rollback(
    model: nn.Module,
    extractor: FlowExtractor,
    validator: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    check: Any,
    threshold: float,
    eos_id: int,
    *,
    tokenizer: Any = None,
    **generate_kwargs: Any,
) -> FlowGenerateOutput:
    """Generate with a running check; rows crossing ``threshold`` stop there and are refined in the call.

    Each crossing row is rolled back to its culprit and regenerated under the block clamp
    (:func:`refine`, ``check.max_rollbacks`` candidates, the lowest-scoring kept); every flow field
    of the result is then recomputed for the returned sequences, and what belonged to the discarded
    run (per-step ``scores``/``logits``, the cache, the refined rows' running scores) is dropped.

    Args:
        model: The base model.
        extractor: Its extractor.
        validator: The validator that scores the running check.
        input_ids: ``[N, P]`` prompts (left padding for batches).
        attention_mask: ``[N, P]``.
        check: The call's :class:`~hf_flowcheck.check_config.FlowCheckConfig` (``check_every`` set).
        threshold: The resolved rollback threshold in ``[0, 1]``.
        eos_id: Ends a crossing row before its rollback.
        tokenizer: For pad ids.
        **generate_kwargs: For ``model.generate``.

    Returns:
        A :class:`~hf_flowcheck.FlowGenerateOutput` with ``flow_rolled_back`` and ``flow_refinement``.
    """
    check_rollback_decoding(generate_kwargs)
    max_rollbacks = check.max_rollbacks or 1
    result = flow_generate(
        extractor,
        validator,
        input_ids,
        attention_mask,
        scores=True,
        features=check.return_flow_features,
        check_every=check.check_every,
        abstain_threshold=threshold,
        abstain_ids=[],  # a crossing row ends at once; refine() then rolls it back
        abstain_eos_id=eos_id,
        check_refit=check.check_refit or "always",
        **dict(generate_kwargs),
    )
    crossed = result.flow_abstained.nonzero().squeeze(-1).tolist()
    result.flow_rolled_back = torch.zeros_like(result.flow_abstained)
    if not crossed:
        return result
    refine_kw = {k: v for k, v in generate_kwargs.items() if k not in ("streamer", "max_length")}
    refine_kw.setdefault("max_new_tokens", int(result.sequences.shape[1] - result.prompt_length))
    fixed = refine(
        model,
        extractor,
        validator,
        result,
        RefineConfig(num_culprits=max_rollbacks, rescore=max_rollbacks > 1),
        rows=crossed,
        tokenizer=tokenizer,
        **refine_kw,
    )
    # Every flow field is recomputed for the returned sequences (teacher-forced equals capture).
    seqs = fixed.sequences
    prompt_len = int(result.prompt_length)
    full_att = torch.cat([attention_mask, torch.ones_like(seqs[:, prompt_len:])], dim=1).to(seqs.device)
    resp = torch.zeros_like(seqs)
    resp[:, prompt_len:] = 1
    feats = extractor.extract(seqs, full_att, resp)
    result.sequences = seqs
    # What generate() returned per step belongs to the sequences before the rollback.
    setattr(result, output_cache_field(result), None)
    for name in ("scores", "logits", "attentions", "hidden_states"):
        if getattr(result, name, None) is not None:
            setattr(result, name, None)
    if result.flow_running_scores is not None:
        # [checks, N]: the refined rows' running scores were of the answer that was replaced
        result.flow_running_scores[:, fixed.refined.to(result.flow_running_scores.device)] = float("nan")
    attach_scores(result, validator, feats)
    if check.return_flow_features:
        result.flow_features = feats
    result.flow_rolled_back = fixed.refined.clone()
    result.flow_abstained = result.flow_abstained & ~fixed.refined
    result.flow_refinement = fixed
    return result
