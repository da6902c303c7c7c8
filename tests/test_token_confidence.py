"""The token-confidence channel (``FlowConfig(state_summary='token_confidence')``): one definition,
equal to the model's own logits, the same in teacher forcing, generation and streaming checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from test_extraction import ForceTokenAt, _left_padded
from test_terminators import PROMPT, VocabCharTokenizer
from transformers import LogitsProcessorList

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowExtractor
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig
from hf_flowcheck.generation import capture_generate

CONF = dict(state_summary="token_confidence")


def _from_logits(model, ids, att, mask):
    """``[N, 3]`` (-mean log p, -min log p, mean entropy) of the masked tokens from the model's logits."""
    pos = (att.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits, -1)
    out = torch.zeros(ids.shape[0], 3)
    for i in range(ids.shape[0]):
        p = mask[i].nonzero().squeeze(-1)
        lp = logp[i, p - 1].gather(-1, ids[i, p, None]).squeeze(-1)
        ent = -(logp[i, p - 1].exp() * logp[i, p - 1]).sum(-1)
        out[i] = torch.stack([-lp.mean(), -lp.min(), ent.mean()])
    return out


@torch.no_grad()
def test_teacher_forced_channel_equals_the_models_logits(core_family):
    model = make_tiny_model(core_family)
    ext = FlowExtractor(model, tiny_flow_config(**CONF))
    ids, att = _left_padded(torch.Generator().manual_seed(0), [9, 6, 8])
    resp = torch.zeros_like(ids)
    resp[:, -4:] = 1
    feats = ext.extract(ids, att, resp)
    assert feats.states.shape == (3, 1, 3)
    expected = _from_logits(model, ids, att, ext.token_mask(ids, att, resp))
    torch.testing.assert_close(feats.states[:, 0], expected, atol=1e-4, rtol=1e-4)
    # the cheap path (one forward, no signatures) is the same code
    torch.testing.assert_close(ext.token_confidence(ids, att, resp), feats.states, atol=1e-6, rtol=1e-6)
    # and the flow signatures do not change when the channel is on
    plain = FlowExtractor(model, tiny_flow_config()).extract(ids, att, resp)
    torch.testing.assert_close(feats.values, plain.values)


@torch.no_grad()
def test_generate_capture_equals_teacher_forced(core_family):
    model = make_tiny_model(core_family)
    ext = FlowExtractor(model, tiny_flow_config(**CONF))
    ids, att = _left_padded(torch.Generator().manual_seed(1), [6, 4, 5])
    prompt_len = ids.shape[1]
    stop = LogitsProcessorList([ForceTokenAt(prompt_len, row=1, step=3, token=98)])
    out, feats = capture_generate(
        ext, ids, attention_mask=att, max_new_tokens=6, do_sample=False, logits_processor=stop, pad_token_id=0
    )
    full_att = torch.cat([att, torch.ones_like(out[:, prompt_len:])], dim=1)
    resp = torch.zeros_like(out)
    resp[:, prompt_len:] = 1
    replay = ext.extract(out, full_att, resp)
    torch.testing.assert_close(feats.states, replay.states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.values, replay.values, atol=1e-4, rtol=1e-4)
    # the first answer token is read at the prompt's last position: not zero, and from the model
    expected = _from_logits(model, out, full_att, ext.token_mask(out, full_att, resp))
    torch.testing.assert_close(feats.states[:, 0], expected, atol=1e-4, rtol=1e-4)


def test_terminators_stay_out_of_the_channel():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config(**CONF), tokenizer=VocabCharTokenizer())
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    got = []
    for end in ["", "\n", " \n", "  "]:
        a = tok(" Ann Lee" + end, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + a + [98]])
        resp = torch.tensor([[0] * len(p) + [1] * (len(a) + 1)])
        got.append(ext.extract(ids, response_mask=resp).states)
    for other in got[1:]:
        torch.testing.assert_close(other, got[0])


def _confidence_validator(model, seed=0):
    cfg = tiny_flow_config(**CONF)
    torch.manual_seed(seed)
    v = FlowValidator(
        ValidatorConfig.from_feature_names(
            cfg.feature_names, hidden=16, embed=8, gru_hidden=8, state_dim=3, state_blocks=(0,)
        ),
        flow_config=cfg,
    )
    v.set_base_model(model)
    return v.eval()


@torch.no_grad()
def test_flow_confidence_validator_in_generate_and_streaming_equals_teacher_forced():
    model = make_tiny_model("llama")
    v = _confidence_validator(model)
    fc = FlowCheckedModelForCausalLM(model, v)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    kw = dict(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, suppress_tokens=[98])
    out = fc.generate(**kw, return_flow_scores=True, return_flow_features=True)
    resp = torch.zeros_like(out.sequences)
    resp[:, ids.shape[1] :] = 1
    replay = fc.extractor.extract(out.sequences, response_mask=resp)
    torch.testing.assert_close(out.flow_features.states, replay.states, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.flow_scores, v.score_features(replay).scores, atol=1e-5, rtol=1e-5)
    assert all(math.isfinite(float(s)) for s in out.flow_scores)
    streamed = fc.generate(**kw, return_flow_scores=True, flow_check_every=1)
    torch.testing.assert_close(streamed.flow_scores, out.flow_scores, atol=1e-5, rtol=1e-5)
    # a running score after k tokens is the teacher-forced score of those k tokens
    k = 3
    prefix = out.sequences[:, : ids.shape[1] + k]
    part = fc.extractor.extract(prefix, response_mask=resp[:, : prefix.shape[1]])
    check = streamed.flow_check_steps.tolist().index(k)
    running = streamed.flow_running_scores[check]
    torch.testing.assert_close(running, v.score_features(part).scores, atol=1e-5, rtol=1e-5)


def test_streaming_reads_each_tokens_distribution_once(monkeypatch):
    import hf_flowcheck.extraction as extraction

    model = make_tiny_model("llama")
    fc = FlowCheckedModelForCausalLM(model, _confidence_validator(model))
    rows_read = []
    real = extraction.token_confidence_rows

    def counting(r_before, *a, **k):
        rows_read.append(r_before.shape[0])
        return real(r_before, *a, **k)

    monkeypatch.setattr(extraction, "token_confidence_rows", counting)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    fc.generate(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_flow_scores=True,
                flow_check_every=1, suppress_tokens=[98])  # fmt: skip
    assert sum(rows_read) == 6  # one readout per token over the whole generation, not one per check


@pytest.mark.parametrize("state_dim", [2, 5])
def test_a_validator_whose_state_width_is_not_the_channels_is_refused(state_dim):
    cfg = tiny_flow_config(**CONF)
    with pytest.raises(ValueError, match="token_confidence"):
        FlowValidator(
            ValidatorConfig.from_feature_names(
                cfg.feature_names, hidden=16, embed=8, gru_hidden=8, state_dim=state_dim, state_blocks=(0,)
            ),
            flow_config=cfg,
        )
