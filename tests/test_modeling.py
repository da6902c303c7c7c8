"""FlowCheckedModelForCausalLM on tiny models: parity, scores == teacher-forced, streaming, errors."""

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config, tiny_validator
from transformers import GenerationConfig

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowGenerateOutput
from hf_flowcheck.fingerprint import FingerprintMismatchError


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7], [9, 8, 7, 6, 5]])
    att = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, att


def test_flag_off_is_the_base_generate(wrapped):
    ids, att = _batch()
    plain = wrapped.base_model.generate(input_ids=ids, attention_mask=att, max_new_tokens=6, do_sample=False)
    same = wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=6, do_sample=False)
    assert torch.equal(plain, same)
    assert wrapped.config is wrapped.base_model.config  # delegation
    assert wrapped.get_base_model() is wrapped.base_model


@pytest.mark.parametrize("do_sample", [False, True])
def test_scores_equal_teacher_forced_validator(wrapped, do_sample):
    ids, att = _batch()
    torch.manual_seed(0)
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=6,
        do_sample=do_sample,
        return_flow_scores=True,
        return_flow_features=True,
    )
    assert isinstance(out, FlowGenerateOutput)
    assert out.flow_scores.shape == (2,) and ((out.flow_scores >= 0) & (out.flow_scores <= 1)).all()
    p = ids.shape[1]
    full_att = torch.cat([att, torch.ones_like(out.sequences[:, p:])], 1)
    resp = torch.zeros_like(out.sequences)
    resp[:, p:] = 1
    replay = wrapped.extractor.extract(out.sequences, full_att, resp)
    ref = wrapped.validator.score_features(replay)
    torch.testing.assert_close(out.flow_scores, ref.scores, atol=1e-5, rtol=0)
    assert torch.equal(out.flow_culprits[:, 1], ref.culprit_block)
    assert torch.equal(out.flow_culprits[:, 0], ref.culprit_position)
    # The culprit is the riskiest token, at the block of its largest event, in the generated part.
    assert (out.flow_culprits[:, 0] >= p).all()
    col = out.flow_token_scores.nan_to_num(-1.0).argmax(-1)
    assert torch.equal(out.flow_positions.gather(1, col[:, None]).squeeze(1), out.flow_culprits[:, 0])
    ev = out.flow_event_scores.masked_fill(~out.flow_event_mask, float("-inf"))
    assert torch.equal(ev[torch.arange(len(col)), :, col].argmax(-1), out.flow_culprits[:, 1])


def test_generation_config_flag(wrapped):
    ids, att = _batch()
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, return_flow_scores=True)
    out = wrapped.generate(input_ids=ids, attention_mask=att, generation_config=gc)
    assert out.flow_scores is not None and out.flow_scores.shape == (2,)


def test_no_validator_error_but_features_allowed():
    model = make_tiny_model("llama")
    fc = FlowCheckedModelForCausalLM(model, None, tiny_flow_config())
    ids, att = _batch()
    with pytest.raises(ValueError, match="needs a validator"):
        fc.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, return_flow_scores=True)
    out = fc.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, return_flow_features=True)
    assert out.flow_features is not None and out.flow_scores is None


def test_wrong_base_model_is_refused():
    v = tiny_validator(make_tiny_model("llama", seed=0))
    with pytest.raises(FingerprintMismatchError, match="readout_sha256"):
        FlowCheckedModelForCausalLM(make_tiny_model("llama", seed=1), v)


def test_beams_zero_tokens_and_long_prompts(wrapped):
    ids, att = _batch()
    with pytest.raises(ValueError, match="num_beams"):
        wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, num_beams=2, return_flow_scores=True)
    long_ids = torch.randint(2, 97, (1, 250))
    with pytest.raises(ValueError, match="context of 256"):
        wrapped.generate(input_ids=long_ids, max_new_tokens=10, return_flow_scores=True)


def test_only_end_token_gives_nan_with_flag(wrapped):
    from transformers import LogitsProcessor, LogitsProcessorList

    class ForceEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:] = -float("inf")
            scores[:, 98] = 0.0
            return scores

    ids, att = _batch()
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=4,
        return_flow_scores=True,
        logits_processor=LogitsProcessorList([ForceEos()]),
    )
    assert torch.isnan(out.flow_scores).all() and not out.flow_has_events.any()
    assert (out.flow_culprits == -1).all()


def test_streaming_records_running_scores_and_abstains(wrapped):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(99)}
    vocab.update({"I": 60, "am": 61, "not": 62, "sure.": 63})
    tk = Tokenizer(models.WordLevel({k: v for k, v in vocab.items()}, unk_token="w3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped.tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="w98", pad_token="w0")
    ids, att = _batch()
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=12,
        do_sample=False,
        return_flow_scores=True,
        flow_check_every=3,
    )
    assert out.flow_running_scores.shape == (3, 2) and out.flow_check_steps.tolist() == [3, 6, 9]
    assert not out.flow_abstained.any()
    # Threshold 0: every row abstains at the first check and ends with the message and EOS.
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=12,
        do_sample=False,
        return_flow_scores=True,
        flow_check_every=3,
        flow_abstain_threshold=0.0,
        flow_abstain_message="I am not sure.",
    )
    assert out.flow_abstained.all()
    p = ids.shape[1]
    msg = wrapped.tokenizer(" I am not sure.", add_special_tokens=False).input_ids
    for row in range(2):
        gen = out.sequences[row, p:].tolist()
        assert gen[3 : 3 + len(msg)] == msg and gen[3 + len(msg)] == 98
    # The final score covers only the 3 tokens before the abstention.
    assert (out.flow_positions >= 0).sum(-1).tolist() == [3, 3]


def test_save_and_reload(tmp_path, wrapped):
    wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "flow_config.json").is_file() and (tmp_path / "validator" / "model.safetensors").is_file()
    again = FlowCheckedModelForCausalLM(wrapped.base_model, str(tmp_path / "validator"))
    ids, att = _batch()
    a = wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=4, return_flow_scores=True)
    b = again.generate(input_ids=ids, attention_mask=att, max_new_tokens=4, return_flow_scores=True)
    torch.testing.assert_close(a.flow_scores, b.flow_scores)


def test_peft_lora_wrapped():
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama")
    v = tiny_validator(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    fc = FlowCheckedModelForCausalLM(lora, v)
    out = fc.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, return_flow_scores=True)
    assert out.flow_scores.shape == (1,)


@pytest.mark.parametrize("bad", [0, 2.5, -1, True])
def test_flow_check_every_is_validated(wrapped, bad):
    ids, att = _batch()
    with pytest.raises(ValueError, match="flow_check_every"):
        wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, flow_check_every=bad)


@pytest.mark.parametrize("flag", ["return_flow_scores", "return_flow_features"])
def test_flow_flags_must_be_booleans(wrapped, flag):
    ids, att = _batch()
    with pytest.raises(ValueError, match=f"{flag}='no' must be True or False"):
        wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, **{flag: "no"})


def test_abstain_threshold_without_checks_is_refused(wrapped):
    ids, att = _batch()
    with pytest.raises(ValueError, match="needs flow_check_every"):
        wrapped.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, flow_abstain_threshold=0.5)
    with pytest.raises(ValueError, match="'recommended'"):
        wrapped.generate(
            input_ids=ids, attention_mask=att, max_new_tokens=3, flow_check_every=1, flow_abstain_threshold="high"
        )
    with pytest.raises(ValueError, match=r"no 'precision_0\.8' threshold"):
        wrapped.generate(
            input_ids=ids,
            attention_mask=att,
            max_new_tokens=3,
            flow_check_every=1,
            flow_abstain_threshold="recommended",
        )


def test_input_shapes_are_checked(wrapped):
    ids, att = _batch()
    with pytest.raises(ValueError, match="unsqueeze"):
        wrapped.generate(input_ids=ids[0], max_new_tokens=3, return_flow_scores=True)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        wrapped.generate(input_ids=ids, attention_mask=att[:, 1:], max_new_tokens=3, return_flow_scores=True)
    with pytest.raises(ValueError, match=r"integer token ids, got dtype torch\.float32"):
        wrapped.generate(input_ids=ids.float(), attention_mask=att, max_new_tokens=3, return_flow_scores=True)
    with pytest.raises(ValueError, match="empty prompt"):
        wrapped.generate(input_ids=ids[:, :0], attention_mask=att[:, :0], max_new_tokens=3, return_flow_scores=True)
    no_prompt = att.clone()
    no_prompt[1] = 0
    with pytest.raises(ValueError, match=r"masks every token of row\(s\) \[1\]"):
        wrapped.generate(input_ids=ids, attention_mask=no_prompt, max_new_tokens=3, flow_check_every=1)


def test_padded_ids_without_mask_get_the_inferred_mask(wrapped):
    ids, att = _batch()  # row 0 is left padded with the pad id 0
    with_mask = wrapped.generate(
        input_ids=ids, attention_mask=att, max_new_tokens=4, do_sample=False, return_flow_scores=True, pad_token_id=0
    )
    inferred = wrapped.generate(
        input_ids=ids, max_new_tokens=4, do_sample=False, return_flow_scores=True, pad_token_id=0
    )
    assert torch.equal(with_mask.sequences, inferred.sequences)
    torch.testing.assert_close(with_mask.flow_scores, inferred.flow_scores)


def test_num_return_sequences_is_supported_with_sampling(wrapped):
    ids, att = _batch()
    torch.manual_seed(0)
    out = wrapped.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=4,
        do_sample=True,
        num_return_sequences=3,
        return_flow_scores=True,
    )
    torch.manual_seed(0)
    plain = wrapped.base_model.generate(
        input_ids=ids, attention_mask=att, max_new_tokens=4, do_sample=True, num_return_sequences=3
    )
    assert out.sequences.shape[0] == 6 and out.flow_scores.shape == (6,)
    assert torch.equal(out.sequences, plain)
    with pytest.raises(ValueError, match="do_sample=True"):
        wrapped.generate(
            input_ids=ids, attention_mask=att, max_new_tokens=4, num_return_sequences=2, return_flow_scores=True
        )


def test_bundled_validators_load_by_name():
    from hf_flowcheck.bundled import bundled_validators
    from hf_flowcheck.modeling import _load_validator

    name = sorted(bundled_validators())[0]
    v, _ = _load_validator(f"bundled:{name}")
    assert v.base_fingerprint and v.config.num_features > 0
    with pytest.raises(ValueError, match="bundled: "):
        _load_validator("bundled:no-such-validator")


def test_flow_config_must_match_the_validator_but_for_the_basis_solver():
    import dataclasses

    model = make_tiny_model("llama")
    v = tiny_validator(model)
    with pytest.raises(ValueError, match="differs from the one the validator was trained with"):
        FlowCheckedModelForCausalLM(model, v, dataclasses.replace(v.flow_config, seed=5))
    fast = FlowCheckedModelForCausalLM(model, v, dataclasses.replace(v.flow_config, basis_solver="subspace"))
    exact = FlowCheckedModelForCausalLM(model, v)
    ids, att = _batch()
    kw = dict(input_ids=ids, attention_mask=att, max_new_tokens=6, do_sample=False, return_flow_scores=True)
    torch.testing.assert_close(fast.generate(**kw).flow_scores, exact.generate(**kw).flow_scores, atol=1e-3, rtol=0)


def test_bundled_validator_under_half_precision_says_why_it_is_not_loaded():
    import warnings

    from hf_flowcheck.bundled import _fingerprint, bundled_validators, default_validator_for

    folder = next(iter(bundled_validators().values()))
    want = _fingerprint(folder)
    model = make_tiny_model("llama", num_hidden_layers=want["num_blocks"], hidden_size=want["hidden_size"],
                            num_attention_heads=1, num_key_value_heads=1).to(torch.bfloat16)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert default_validator_for(model) is None
    assert any("dtype=torch.float32" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_the_default_bundled_validator_is_the_one_trained_on_most_prompt_styles(family):
    from hf_flowcheck.bundled import _preference, bundled_validators
    from hf_flowcheck.data.corpus import PROMPT_STYLES
    from hf_flowcheck.detectors import FlowValidator

    same_model = [f for name, f in bundled_validators().items() if name.startswith(family)]
    chosen = min(same_model, key=_preference)
    assert chosen.name == f"{family}-corpus"
    v = FlowValidator.from_pretrained(chosen)
    meta = v.training_metadata
    assert meta["prompt_styles"] == list(PROMPT_STYLES) and "truthfulqa" not in meta["tasks"]
    assert v.calibration != (1.0, 0.0) and meta["calibration"]["ece_after"] < meta["calibration"]["ece_before"]
    for style in PROMPT_STYLES:  # a verdict threshold chosen on that style's validation answers
        assert 0.0 < v.recommended_threshold("precision_0.9", prompt_style=style) < 1.0
    # the design with the best mean held-out AUROC on each model (docs/results.md): SmolLM2 flow + the
    # residual entering block 20 averaged over the answer's tokens, Qwen flow + the answer's token confidence
    assert not v.flow_config.score_terminators
    if family.startswith("smollm2"):
        assert v.flow_config.state_summary == "mean"
        assert (v.config.state_dim, v.config.state_blocks) == (576, (20,))
        assert int(v.training_metadata["hyperparameters"]["probe_states"].split()[0]) > 1000  # the widened probe
    else:
        assert v.flow_config.state_summary == "token_confidence"
        assert (v.config.state_dim, v.config.state_blocks) == (3, (0,))
    card = (chosen / "README.md").read_text()
    for section in ("## Trained on", "## Intended use", "## Limits", "## Transfer (held-out prompt styles and tasks)"):
        assert section in card
