"""A few end-to-end checks on the real offline default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import re

import pytest
import torch

from hf_flowcheck import FlowConfig, FlowExtractor
from hf_flowcheck.generation import capture_generate

pytestmark = pytest.mark.real_model


PROMPTS = [
    "Knowledge: Paris is the capital and largest city of France.\nQuestion: What is the capital of France?\nAnswer:",
    "Knowledge: Gustave Eiffel's company built the tower.\nQuestion: Who built the Eiffel Tower?\nAnswer:",
]


def test_generate_capture_equals_replay_on_smollm2(smollm2):
    model, tok = smollm2
    ext = FlowExtractor(model, FlowConfig(), tokenizer=tok)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out, feats = capture_generate(
        ext,
        enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    plain = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, plain)
    assert feats.values.shape[:2] == (2, 30) and feats.values.shape[-1] == 10
    assert torch.isfinite(feats.values).all() and feats.valid.any(-1).any(-1).all()
    p = enc.input_ids.shape[1]
    full_att = torch.cat([enc.attention_mask, torch.ones_like(out[:, p:])], dim=1)
    resp = torch.zeros_like(out)
    resp[:, p:] = 1
    replay = ext.extract(out, full_att, resp)
    assert torch.equal(replay.positions, feats.positions)
    # KV-cached decoding and a full forward differ by float rounding; features agree closely.
    torch.testing.assert_close(feats.values, replay.values, atol=2e-3, rtol=2e-3)


def test_smollm2_batch_invariance_and_boundaries(smollm2):
    model, tok = smollm2
    texts = [PROMPTS[0] + " Paris.", PROMPTS[1] + " Gustave Eiffel's company."]
    answers = [" Paris.", " Gustave Eiffel's company."]
    enc = tok(texts, return_tensors="pt", padding=True)
    resp = torch.zeros_like(enc.input_ids)
    for i, a in enumerate(answers):
        n = len(tok(a).input_ids)
        resp[i, -n:] = 1
    for boundary in ("normalized", "residual"):
        ext = FlowExtractor(model, FlowConfig(boundary=boundary), tokenizer=tok)
        batch = ext.extract(enc.input_ids, enc.attention_mask, resp)
        assert torch.isfinite(batch.values).all()
        keep = enc.attention_mask[0].bool()
        alone = ext.extract(enc.input_ids[:1, keep], response_mask=resp[:1, keep])
        n = alone.values.shape[2]
        torch.testing.assert_close(batch.values[0, :, :n], alone.values[0], atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def checked(smollm2):
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.bundled import default_validator_for

    base, tok = smollm2
    return FlowCheckedModelForCausalLM(base, default_validator_for(base), tokenizer=tok)


def test_bundled_validator_scores_a_batch(checked):
    assert checked.validator is not None, "the bundled default validator for SmolLM2 was not found"
    tok = checked.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = checked.generate(
        **enc, max_new_tokens=10, do_sample=False, return_flow_scores=True, return_flow_features=True
    )
    assert out.flow_scores.shape == (2,) and ((out.flow_scores >= 0) & (out.flow_scores <= 1)).all()
    p = enc.input_ids.shape[1]
    assert (out.flow_culprits[:, 0] >= p).all() and (out.flow_culprits[:, 1] < 30).all()
    full_att = torch.cat([enc.attention_mask, torch.ones_like(out.sequences[:, p:])], dim=1)
    resp = torch.zeros_like(out.sequences)
    resp[:, p:] = 1
    replay = checked.extractor.extract(out.sequences, full_att, resp)
    ref = checked.validator.score_features(replay)
    # Cached decoding vs one full forward: float rounding only.
    torch.testing.assert_close(out.flow_scores, ref.scores, atol=1e-3, rtol=0)
    summary = checked.validator.flow_config.state_summary
    if summary != "none":  # the default's state input (the pooled residual, or the token confidence)
        torch.testing.assert_close(out.flow_features.states, replay.states, atol=1e-3, rtol=1e-3)
    if summary == "token_confidence":
        assert bool((out.flow_features.states[:, 0, 1] >= out.flow_features.states[:, 0, 0]).all())  # min <= mean
    plain = checked.generate(**enc, max_new_tokens=10, do_sample=False)
    assert torch.equal(plain, out.sequences)
    # The culprit is a token with a word character, the riskiest such token of the answer.
    assert out.flow_features.word_tokens is not None
    for i, (t0, _) in enumerate(out.flow_culprits.tolist()):
        assert re.search(r"\w", tok.decode([int(out.sequences[i, t0])])), tok.decode(out.sequences[i, p:])
        risk = out.flow_token_scores[i].nan_to_num(-1.0).masked_fill(~out.flow_features.word_tokens[i], -1.0)
        assert int(out.flow_positions[i, int(risk.argmax())]) == t0


def test_streaming_abstention_end_to_end(checked):
    tok = checked.tokenizer
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    out = checked.generate(
        **enc,
        max_new_tokens=16,
        do_sample=False,
        return_flow_scores=True,
        flow_check_every=2,
        flow_abstain_threshold=0.0,
        flow_abstain_message="I am not sure.",
    )
    assert out.flow_abstained.all() and out.flow_running_scores.shape[1] == 2
    texts = tok.batch_decode(out.sequences[:, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert all("I am not sure." in t for t in texts)


def test_answer_line_stop_skips_a_leading_newline(smollm2):
    """A HaluEval-QA record whose greedy answer starts with a newline still gets an answer."""
    from hf_flowcheck.data import clean_generation, load_halueval_qa, qa_fewshot_prompt
    from hf_flowcheck.stopping import AnswerLineStop

    model, tok = smollm2
    rec = load_halueval_qa(limit=4)[3]
    enc = tok(qa_fewshot_prompt(rec), return_tensors="pt")
    p = enc.input_ids.shape[1]
    kw = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = model.generate(**enc, stop_strings=["\n"], tokenizer=tok, **kw)
    assert clean_generation(tok.decode(plain[0, p:], skip_special_tokens=True)) == ""  # the problem this fixes
    out = model.generate(**enc, stopping_criteria=[AnswerLineStop(tok, p)], **kw)
    raw = tok.decode(out[0, p:], skip_special_tokens=True)
    assert clean_generation(raw) != "" and raw.startswith("\n") and raw.endswith("\n")
    assert raw.strip().count("\n") == 0  # stopped at the end of the first non-empty line


def test_sampling_agreement_answer_line_stop_keeps_the_samples(smollm2):
    """Stopping samples at their first non-empty line changes the cost, not the cleaned samples."""
    from types import SimpleNamespace

    from hf_flowcheck.detectors.base import scored_examples
    from hf_flowcheck.detectors.baselines import SamplingAgreementDetector

    model, tok = smollm2
    ex = SimpleNamespace(prompt=PROMPTS[1], completion=" Gustave Eiffel", answer="Gustave Eiffel", label=0, uid="u0")
    (scored,) = scored_examples(tok, [ex])
    fast = SamplingAgreementDetector(3, max_new_tokens=24, seed=1)
    slow = SamplingAgreementDetector(3, max_new_tokens=24, seed=1, stop_at_answer_line=False)
    assert fast.stop_at_answer_line and not slow.stop_at_answer_line
    assert fast.samples(model, scored, tok) == slow.samples(model, scored, tok)


def test_stream_risk_example_on_smollm2_with_the_streaming_validator(checked):
    """The streaming example's iterator on the real model: running scores while it writes, and a
    final score that equals the non-streamed one (refit "doubling" changes only the running scores)."""
    import importlib.util
    from pathlib import Path

    from hf_flowcheck import FlowCheckedModelForCausalLM

    path = Path(__file__).resolve().parents[1] / "examples" / "stream_risk.py"
    spec = importlib.util.spec_from_file_location("stream_risk", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    model = FlowCheckedModelForCausalLM(checked.base_model, ex.STREAMING_VALIDATOR, tokenizer=checked.tokenizer)
    assert model.validator.config.state_dim == 0  # a streaming validator reads no last-token state
    tok = model.tokenizer
    ids = tok(PROMPTS[:1], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    chunks = list(ex.stream_answer(model, tok, ids, flow_check_refit="doubling", **kw))
    scores = [c.score for c in chunks if not c.final and c.score == c.score]
    assert len(scores) >= 5 and all(0.0 <= s <= 1.0 for s in scores)
    plain = model.generate(input_ids=ids, return_flow_scores=True, **kw)
    assert chunks[-1].final and abs(chunks[-1].score - float(plain.flow_scores[0])) < 1e-4
    assert "".join(c.text for c in chunks) == tok.decode(plain.sequences[0, ids.shape[1] :], skip_special_tokens=True)
