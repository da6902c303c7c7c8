"""Serving: many threads on one model, reused streamers, and decoding options the rollback refuses."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import make_tiny_model, tiny_validator
from test_baselines import CharTokenizer

from hf_flowcheck import FlowCheckedModelForCausalLM, FlowTextStreamer
from hf_flowcheck.architectures import model_lock

PROMPTS = [torch.tensor([[5, 6, 7, 8, 9, 10]]), torch.tensor([[11, 12, 13, 14]]), torch.tensor([[20, 21, 22]])]
KW = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[98])


@pytest.fixture(scope="module")
def pair():
    model = make_tiny_model("llama")
    v = tiny_validator(model)
    return FlowCheckedModelForCausalLM(model, v), FlowCheckedModelForCausalLM(model, v)


def _no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def _request(fc, kind, prompt):
    if kind == "plain":
        return fc.generate(input_ids=prompt, **KW)
    if kind == "flow":
        out = fc.generate(input_ids=prompt, return_flow_scores=True, **KW)
        return out.sequences, out.flow_scores
    if kind == "check":
        out = fc.generate(input_ids=prompt, flow_check_every=2, **KW)
        return out.sequences, out.flow_scores, out.flow_running_scores
    streamer = FlowTextStreamer(CharTokenizer(), timeout=60)
    out = fc.generate(input_ids=prompt, streamer=streamer, **KW)
    return out.sequences, out.flow_scores, tuple(c.text for c in streamer.chunks)


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.allclose(a, b, atol=1e-5, equal_nan=True)
    if isinstance(a, tuple) and a and isinstance(a[0], str):
        return a == b
    return all(_same(x, y) for x, y in zip(a, b, strict=True))


def test_eight_threads_of_mixed_requests_get_what_they_would_get_alone(pair):
    kinds = ["plain", "flow", "check", "stream"]
    jobs = [(pair[i % 2], kinds[i % 4], PROMPTS[i % 3]) for i in range(16)]
    alone = [_request(fc, kind, p) for fc, kind, p in jobs]
    got: dict[int, object] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(w):
        start.wait()
        for i in range(w, len(jobs), 8):
            try:
                got[i] = _request(*jobs[i])
            except BaseException as err:
                errors.append(err)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(got) == len(jobs)
    for i, expected in enumerate(alone):
        assert _same(expected, got[i]), jobs[i][1]
    _no_hooks(pair[0].base_model)


def test_two_wrappers_share_one_lock(pair):
    assert pair[0]._model_lock is pair[1]._model_lock is model_lock(pair[0].base_model)
    assert model_lock(make_tiny_model("llama")) is not pair[0]._model_lock


def test_a_reused_streamer_streams_only_the_new_answer(pair):
    fc = pair[0]
    streamer = FlowTextStreamer(CharTokenizer())
    fc.generate(input_ids=PROMPTS[0], streamer=streamer, **KW)
    second = fc.generate(input_ids=PROMPTS[1], streamer=streamer, **KW)
    answer = second.sequences[0, PROMPTS[1].shape[1] :].tolist()
    assert [t for c in streamer.chunks for t in c.token_ids] == answer
    assert list(streamer) == streamer.chunks  # the queue holds the second answer only
    # the base model's plain generate with the same streamer after a flow-checked one: the same
    plain = fc.base_model.generate(input_ids=PROMPTS[2], streamer=streamer, max_new_tokens=4, do_sample=False)
    assert [t for c in streamer.chunks for t in c.token_ids] == plain[0, PROMPTS[2].shape[1] :].tolist()


def test_a_streamer_in_use_is_refused():
    streamer = FlowTextStreamer(CharTokenizer())
    streamer.begin_flow(3)
    streamer.put(torch.tensor([[1, 2, 3]]))
    with pytest.raises(RuntimeError, match="one streamer per request"):
        streamer.begin_flow(3)


@pytest.mark.parametrize("bad, name", [({"use_cache": False}, "use_cache"), ({"num_beams": 2}, "num_beams")])
def test_refine_refuses_decoding_it_cannot_honour(pair, bad, name):
    fc = pair[0]
    out = fc.generate(input_ids=PROMPTS[0], return_flow_scores=True, **KW)
    with pytest.raises(ValueError, match=name):
        fc.refine(out, threshold=0.0, **bad)
    with pytest.raises(ValueError, match=name):
        fc.generate(input_ids=PROMPTS[0], flow_check_every=1, flow_rollback_threshold=0.0, **KW, **bad)
    _no_hooks(fc.base_model)


def test_after_a_rollback_nothing_of_the_discarded_run_is_returned(pair):
    fc = pair[0]
    out = fc.generate(input_ids=PROMPTS[0], flow_check_every=1, flow_rollback_threshold=0.0, output_scores=True, **KW)
    if bool(out.flow_rolled_back.any()):
        assert out.scores is None and out.past_key_values is None
        assert torch.isnan(out.flow_running_scores[:, out.flow_rolled_back]).all()


def test_features_of_another_model_or_recipe_are_refused():
    import dataclasses

    from conftest import tiny_flow_config

    from hf_flowcheck.errors import FingerprintMismatchError
    from hf_flowcheck.extraction import FlowExtractor

    a, b = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    cfg = tiny_flow_config()
    va = tiny_validator(a, cfg)
    ids, resp = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[0, 0, 1, 1, 1]])
    va.score_features(FlowExtractor(a, cfg).extract(ids, response_mask=resp))  # its own: fine
    with pytest.raises(FingerprintMismatchError, match="another model"):
        va.score_features(FlowExtractor(b, cfg).extract(ids, response_mask=resp))
    other = dataclasses.replace(cfg, center="mean")
    with pytest.raises(ValueError, match="center"):
        va.score_features(FlowExtractor(a, other).extract(ids, response_mask=resp))


def test_refining_another_models_output_is_refused():
    from hf_flowcheck.errors import FingerprintMismatchError

    a, b = make_tiny_model("llama", seed=0), make_tiny_model("llama", seed=1)
    fa = FlowCheckedModelForCausalLM(a, tiny_validator(a))
    fb = FlowCheckedModelForCausalLM(b, tiny_validator(b))
    out = fa.generate(input_ids=PROMPTS[0], return_flow_scores=True, **KW)
    assert out.flow_source.fingerprint == fa.extractor.source.fingerprint
    with pytest.raises(FingerprintMismatchError, match="This output came from another model"):
        fb.refine(out, threshold=0.0)
    _no_hooks(b)


def test_flow_check_config_is_the_loose_flags_in_one_object(pair):
    from hf_flowcheck import FlowCheckConfig

    fc = pair[0]
    cfg = FlowCheckConfig(return_flow_scores=True, check_every=2, check_refit="doubling")
    a = fc.generate(input_ids=PROMPTS[0], flow_check_config=cfg, **KW)
    b = fc.generate(
        input_ids=PROMPTS[0], return_flow_scores=True, flow_check_every=2, flow_check_refit="doubling", **KW
    )
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.flow_running_scores, b.flow_running_scores, equal_nan=True)
    with pytest.raises(ValueError, match="were both given"):
        fc.generate(input_ids=PROMPTS[0], flow_check_config=cfg, flow_check_every=1, **KW)
    with pytest.raises(TypeError, match="FlowCheckConfig"):
        fc.generate(input_ids=PROMPTS[0], flow_check_config={"check_every": 1}, **KW)
    with pytest.raises(ValueError, match="flow_check_every=0"):
        FlowCheckConfig(check_every=0)
    assert not FlowCheckConfig().wants_flow and FlowCheckConfig(return_flow_features=True).wants_flow
