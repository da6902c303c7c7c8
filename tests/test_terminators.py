"""An answer scores for what it says: its terminators (stop newline, trailing spaces, EOS) stay out."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config, tiny_validator
from test_workflows_extract import CharTokenizer

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.extraction import FlowExtractor


class VocabCharTokenizer(CharTokenizer):
    """CharTokenizer plus the two methods the token table reads."""

    def __len__(self):
        return 99

    def get_vocab(self):
        return {self.decode([i], skip_special_tokens=False): i for i in range(99)}

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in seqs]


PROMPT = "Question: who wrote it?\nAnswer:"
ENDINGS = ["", "\n", " \n", "  ", "\n\n"]


def _features(ext, answer_text):
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    a = tok(" Ann Lee" + answer_text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a + [98]])  # the EOS is never scored
    resp = torch.tensor([[0] * len(p) + [1] * (len(a) + 1)])
    return ext.extract(ids, response_mask=resp)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama")


def test_same_answer_scores_the_same_however_it_ends(model):
    cfg = tiny_flow_config(state_summary="last")
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    val = tiny_validator(model, cfg)
    base = _features(ext, "")
    base_score = float(val.score_features(base).scores[0])
    assert math.isfinite(base_score)
    for end in ENDINGS[1:]:
        feats = _features(ext, end)
        assert torch.equal(feats.positions, base.positions), repr(end)
        assert torch.allclose(feats.values, base.values), repr(end)
        assert torch.allclose(feats.states, base.states), repr(end)  # the state is read at the last content token
        assert abs(float(val.score_features(feats).scores[0]) - base_score) <= 0.02


def test_score_terminators_keeps_the_old_behaviour(model):
    cfg = tiny_flow_config(score_terminators=True)
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    assert _features(ext, "\n").values.shape[2] == _features(ext, "").values.shape[2] + 1


def test_no_content_tokens_gets_nan_and_a_flag(model):
    cfg = tiny_flow_config()
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    ids = torch.tensor([[*p, 97, 2, 97]])  # "\n \n": nothing said
    feats = ext.extract(ids, response_mask=torch.tensor([[0] * len(p) + [1, 1, 1]]))
    out = tiny_validator(model, cfg).score_features(feats)
    assert not bool(out.has_events[0]) and math.isnan(float(out.scores[0]))


def test_without_a_tokenizer_it_warns_and_scores_them(model):
    ext = FlowExtractor(model, tiny_flow_config())
    ids = torch.tensor([[5, 6, 7, 97]])
    with pytest.warns(UserWarning, match="no tokenizer"):
        feats = ext.extract(ids, response_mask=torch.tensor([[0, 1, 1, 1]]))
    assert feats.values.shape[2] == 3


def test_format_1_configs_load_with_their_terminators_scored():
    old = FlowConfig().to_dict()
    del old["score_terminators"]
    old["format_version"] = 1
    assert FlowConfig.from_dict(old).score_terminators is True
    assert FlowConfig.from_dict(FlowConfig().to_dict()).score_terminators is False
    assert FlowConfig().score_terminators is False
    # stores keyed before the field existed keep their key
    assert "score_terminators" not in FlowConfig(score_terminators=True).signature_key()
    assert FlowConfig().signature_key() != FlowConfig(score_terminators=True).signature_key()
    with pytest.raises(ValueError, match="score_terminators"):
        FlowConfig(score_terminators="no")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_mean_state_is_the_block_input_averaged_over_content_tokens(family):
    """``state_summary='mean'``: what a pooled hidden-state probe trained on ``hidden_states`` reads at run time.

    ``benchmarks/pooled_state_probe.py`` averages transformers' ``hidden_states[b]`` (the input of block
    ``b``) over the scored tokens; the runtime must hand the validator the same numbers, whatever the end.
    """
    model = make_tiny_model(family)
    ext = FlowExtractor(model, tiny_flow_config(state_summary="mean"), tokenizer=VocabCharTokenizer())
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    a = tok(" Ann Lee", add_special_tokens=False)["input_ids"]
    base = _features(ext, "")
    with torch.no_grad():
        hs = model(torch.tensor([p + a]), output_hidden_states=True).hidden_states
    n_blocks = len(hs) - 1
    want = torch.stack([h[0, len(p) :].mean(0) for h in hs[:n_blocks]])  # [B, d]
    assert base.states.shape[1] == n_blocks + 1
    torch.testing.assert_close(base.states[0, :n_blocks], want, rtol=1e-4, atol=1e-5)
    for end in ENDINGS[1:]:
        torch.testing.assert_close(_features(ext, end).states, base.states, rtol=1e-5, atol=1e-6)


def test_mean_state_validator_scores_generate_as_teacher_forced():
    """A flow + mean-state validator (the pooled probe frozen beside the flow part) through ``generate()``:
    the score at the end and the score of a check every token equal the teacher-forced score."""
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig

    model = make_tiny_model("llama")
    cfg = tiny_flow_config(state_summary="mean")
    torch.manual_seed(0)
    vcfg = ValidatorConfig.from_feature_names(
        cfg.feature_names, hidden=16, embed=8, gru_hidden=8, state_dim=model.config.hidden_size, state_blocks=(1,)
    )
    v = FlowValidator(vcfg, flow_config=cfg)
    with torch.no_grad():
        v.state_head.weight.normal_()  # a state term large enough to move the score
    v.set_base_model(model)
    fc = FlowCheckedModelForCausalLM(model, v.eval())
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    scores = {}
    for every in (None, 1):
        out = fc.generate(input_ids=ids, attention_mask=att, max_new_tokens=6, do_sample=False,
                          return_flow_scores=True, flow_check_every=every)  # fmt: skip
        scores[every] = out.flow_scores
    p = ids.shape[1]
    full_att = torch.cat([att, torch.ones_like(out.sequences[:, p:])], 1)
    resp = torch.zeros_like(out.sequences)
    resp[:, p:] = 1
    feats = fc.extractor.extract(out.sequences, full_att, resp)
    ref = v.score_features(feats).scores
    without_state = v.score_features(dataclasses.replace(feats, states=torch.zeros_like(feats.states))).scores
    assert not torch.allclose(ref, without_state, atol=1e-3)  # the state term matters here
    torch.testing.assert_close(scores[None], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores[1], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["attention", "gru"])
def test_the_culprit_is_a_content_token_however_the_answer_ends(model, head):
    """The culprit is the riskiest token (spec of issue 28): never the stop newline, a space or the EOS."""
    from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig

    cfg = tiny_flow_config()
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    torch.manual_seed(1)
    val = FlowValidator(
        ValidatorConfig.from_feature_names(cfg.feature_names, hidden=16, embed=8, gru_hidden=8, head=head),
        flow_config=cfg,
    ).eval()
    content_end = len(ext.tokenizer(PROMPT)["input_ids"]) + len(ext.tokenizer(" Ann Lee")["input_ids"])
    for end in ENDINGS:
        out = val.score_features(_features(ext, end))
        t0 = int(out.culprit_position[0])
        assert 0 <= t0 < content_end, repr(end)
        risk = out.token_logits[0].nan_to_num(-1e9).masked_fill(~_features(ext, end).word_tokens[0], -1e9)
        assert float(out.token_logits[0, out.culprit_column[0]]) == float(risk.max())


def test_the_culprit_is_the_riskiest_token_with_a_letter_or_digit(model):
    """Punctuation and spaces are scored but never the culprit, unless the answer has nothing else."""
    cfg = tiny_flow_config()
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    val = tiny_validator(model, cfg)
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    a = tok(" Ann, Lee.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + a])
    feats = ext.extract(ids, response_mask=torch.tensor([[0] * len(p) + [1] * len(a)]))
    chars = [tok.decode([i]) for i in ids[0, feats.positions[0]].tolist()]
    assert feats.word_tokens[0].tolist() == [c.isalnum() for c in chars]
    assert "," in chars and "." in chars  # scored: they count towards the answer's score

    plain = val.score_features(dataclasses.replace(feats, word_tokens=None))
    risk = plain.token_logits[0]
    order = torch.argsort(-risk.nan_to_num(-1e9)).tolist()
    # every column in turn is made the only wordless one: the culprit skips it when it was the riskiest
    for skip in order[:3]:
        word = torch.ones_like(feats.word_tokens)
        word[0, skip] = False
        out = val.score_features(dataclasses.replace(feats, word_tokens=word))
        want = order[0] if order[0] != skip else order[1]
        assert int(out.culprit_column[0]) == want
        assert int(out.culprit_block[0]) == int(out.event_logits[0, :, want].argmax())
        assert int(out.culprit_position[0]) == int(feats.positions[0, want])
        torch.testing.assert_close(out.scores, plain.scores)  # the rule moves the culprit, not the score
    none = val.score_features(dataclasses.replace(feats, word_tokens=torch.zeros_like(feats.word_tokens)))
    assert int(none.culprit_column[0]) == int(plain.culprit_column[0]) == order[0]


def test_word_flags_follow_the_rows_through_take_slice_and_padding(model):
    from hf_flowcheck.features import pad_features

    cfg = tiny_flow_config()
    ext = FlowExtractor(model, cfg, tokenizer=VocabCharTokenizer())
    short, long = (
        _features(ext, ""),
        ext.extract(
            torch.tensor([ext.tokenizer(PROMPT + " Ann-Marie Lee, Jr.")["input_ids"]]),
            response_mask=torch.tensor([[0] * len(ext.tokenizer(PROMPT)["input_ids"]) + [1] * 19]),
        ),
    )
    both = pad_features([short, long])
    t_short = short.values.shape[2]
    assert both.word_tokens.shape == both.positions.shape
    assert torch.equal(both.word_tokens[0, :t_short], short.word_tokens[0])
    assert not both.word_tokens[0, t_short:].any()  # padding is never a word
    assert torch.equal(both.word_tokens[1], long.word_tokens[0])
    assert torch.equal(both.take([1, 0]).word_tokens, both.word_tokens.flip(0))
    assert torch.equal(both[1].word_tokens, both.word_tokens[1:])
    assert torch.equal(both.to("cpu").word_tokens, both.word_tokens)
    assert torch.equal(both.select(both.names[:2]).word_tokens, both.word_tokens)
    # a part without flags (a store, no tokenizer) lifts the rule for the whole batch
    bare = dataclasses.replace(short, word_tokens=None)
    assert pad_features([bare, long]).word_tokens is None
    assert FlowExtractor(model, cfg).extract(*_ids_and_response(ext)).word_tokens is None


def _ids_and_response(ext):
    tok = ext.tokenizer
    p = tok(PROMPT)["input_ids"]
    a = tok(" Ann Lee", add_special_tokens=False)["input_ids"]
    return torch.tensor([p + a]), None, torch.tensor([[0] * len(p) + [1] * len(a)])
