"""FlowExtractor end to end on tiny models: batch invariance, generate == replay, edge cases."""

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from transformers import LogitsProcessor, LogitsProcessorList

from hf_flowcheck import FlowConfig, FlowExtractor, NonFiniteStateError
from hf_flowcheck.capture import capture_sizes, rows_of
from hf_flowcheck.generation import capture_generate


class ForceTokenAt(LogitsProcessor):
    """Force ``token`` in ``row`` at generation step ``step`` (to end rows at different lengths)."""

    def __init__(self, prompt_len, row, step, token):
        self.prompt_len, self.row, self.step, self.token = prompt_len, row, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores[self.row] = -float("inf")
            scores[self.row, self.token] = 0.0
        return scores


def _left_padded(gen, lengths, vocab=97):
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(2, vocab, (n,), generator=gen)
        att[i, width - n :] = 1
    return ids, att


def test_batch_invariance(core_family):
    model = make_tiny_model(core_family)
    ext = FlowExtractor(model, tiny_flow_config())
    gen = torch.Generator().manual_seed(0)
    ids, att = _left_padded(gen, [9, 5, 7])
    resp = torch.zeros_like(ids)
    resp[:, -3:] = 1
    batch = ext.extract(ids, att, resp)
    for i in range(3):
        keep = att[i].bool()
        alone = ext.extract(ids[i : i + 1, keep], response_mask=resp[i : i + 1, keep])
        n = alone.values.shape[2]
        torch.testing.assert_close(batch.values[i, :, :n], alone.values[0], atol=1e-4, rtol=1e-4)
        assert batch.valid[i, :, :n].all() and not batch.valid[i, :, n:].any()
        assert batch.sample_keys[i] == alone.sample_keys[0]


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_capture_equals_teacher_forced_replay(core_family, do_sample):
    model = make_tiny_model(core_family)
    ext = FlowExtractor(model, tiny_flow_config())
    gen = torch.Generator().manual_seed(1)
    ids, att = _left_padded(gen, [6, 4, 5])
    prompt_len = ids.shape[1]
    stop = LogitsProcessorList([ForceTokenAt(prompt_len, row=1, step=3, token=98)])  # row 1 ends early
    torch.manual_seed(0)
    out, feats = capture_generate(
        ext,
        ids,
        attention_mask=att,
        max_new_tokens=7,
        do_sample=do_sample,
        logits_processor=stop,
        pad_token_id=0,
    )
    assert out.shape[0] == 3
    counts = feats.num_tokens().tolist()
    assert counts[1] == 3 and 0 < counts[0] <= out.shape[1] - prompt_len  # EOS and what follows are excluded
    full_att = torch.cat([att, torch.ones_like(out[:, prompt_len:])], dim=1)
    resp = torch.zeros_like(out)
    resp[:, prompt_len:] = 1
    replay = ext.extract(out, full_att, resp)
    assert torch.equal(replay.positions, feats.positions)
    assert replay.sample_keys == feats.sample_keys
    torch.testing.assert_close(feats.values, replay.values, atol=1e-4, rtol=1e-4)


def test_generate_returns_what_generate_returns():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())
    ids = torch.tensor([[5, 6, 7, 8]])
    plain = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    seqs, _ = capture_generate(ext, ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(seqs, plain)
    out, _ = capture_generate(
        ext, ids, max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(out.sequences, plain) and len(out.scores) == 5
    assert out.past_key_values.get_seq_length() == plain.shape[1] - 1  # the cache is given back unchanged
    after = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(after, plain)  # no hook left behind


def test_empty_mask_gives_empty_valid_features_not_nan():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    resp = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    f = ext.extract(ids, response_mask=resp)
    assert f.values.shape == (2, 4, 2, 10)
    assert not f.valid[0].any() and f.valid[1].all() and torch.isfinite(f.values).all()
    assert (f.values[0] == 0).all() and (f.positions[0] == -1).all()
    none = ext.extract(ids, response_mask=torch.zeros_like(ids))
    assert none.values.shape == (2, 4, 0, 10) and not none.valid.any()


def test_special_tokens_only_and_first_eos():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())
    ids = torch.tensor([[5, 6, 1, 98, 0], [5, 6, 7, 98, 8]])  # bos/eos/pad are special
    resp = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    f = ext.extract(ids, response_mask=resp)
    assert f.num_tokens().tolist() == [0, 1]  # row 1: the token after the first EOS is excluded
    assert f.positions[1, 0] == 2


def test_token_mask_all_and_response_required():
    model = make_tiny_model("llama")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ext_all = FlowExtractor(model, tiny_flow_config(token_mask="all"))
    f = ext_all.extract(ids)
    assert f.positions[0].tolist() == [1, 2, 3, 4]  # BOS excluded
    _out, g = capture_generate(ext_all, ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert g.positions[0, :4].tolist() == [1, 2, 3, 4] and g.num_tokens()[0] >= 4
    ext = FlowExtractor(model, tiny_flow_config())
    with pytest.raises(ValueError, match="response_mask"):
        ext.extract(ids)


def test_num_beams_refused_clearly():
    ext = FlowExtractor(make_tiny_model("llama"), tiny_flow_config())
    with pytest.raises(ValueError, match="num_beams=3"):
        capture_generate(ext, torch.tensor([[5, 6]]), max_new_tokens=2, num_beams=3)


def test_non_finite_state_names_block_and_position():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())

    def poison(mod, args, out):
        out = out.clone()
        out[0, 3] = float("nan")
        return out

    handle = ext.arch.mlp_modules[2].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteStateError, match=r"block 2 at sequence position 3"):
            ext.extract(torch.tensor([[5, 6, 7, 8, 9]]), response_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(dtype):
    model = make_tiny_model("gpt2").to(dtype)  # LayerNorm with bias in half precision
    ext = FlowExtractor(model, tiny_flow_config())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    f = ext.extract(ids, response_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]))
    assert f.values.dtype == torch.float32 and torch.isfinite(f.values).all()
    ref = FlowExtractor(make_tiny_model("gpt2"), tiny_flow_config()).extract(
        ids, response_mask=torch.tensor([[0, 0, 1, 1, 1, 1]])
    )
    step = f.names.index("attn_mag")
    torch.testing.assert_close(f.values[..., step], ref.values[..., step], atol=0.1, rtol=0.1)


def test_memory_grows_with_masked_tokens_not_prompt():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())
    prompt = torch.randint(2, 97, (1, 200))
    ids = torch.cat([prompt, torch.tensor([[5, 6, 7]])], dim=1)
    resp = torch.zeros_like(ids)
    resp[:, -3:] = 1
    n_blocks, d = 4, 32
    with capture_sizes() as sizes:
        ext.extract(ids, response_mask=resp)
        capture_generate(ext, prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert sizes == [
        3 * (n_blocks + 1 + 2 * n_blocks) * d * 4 + 3 * 16,
        4 * (n_blocks + 1 + 2 * n_blocks) * d * 4 + 4 * 16,
    ]
    with capture_sizes() as outer:
        with capture_sizes() as inner:
            ext.extract(ids, response_mask=resp)
        ext.extract(ids, response_mask=resp)
    assert len(inner) == 1 and outer == inner * 2  # nested scopes both hear, a closed one stops


def test_other_configs_run(core_family):
    model = make_tiny_model(core_family)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    resp = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    for cfg in (
        tiny_flow_config(boundary="residual"),
        tiny_flow_config(center="coordinate_median", drift_anchor="start", transport_min_overlap=0.5),
        FlowConfig(subspace_dim=8, num_competitors=8),  # default windows wider than the model
    ):
        f = FlowExtractor(model, cfg).extract(ids, response_mask=resp)
        assert torch.isfinite(f.values).all() and f.valid.all()


def test_subspace_basis_solver_gives_the_eigensolve_features(core_family):
    model = make_tiny_model(core_family)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 90, (2, 14), generator=gen)
    resp = torch.zeros_like(ids)
    resp[:, 5:] = 1
    exact = FlowExtractor(model, tiny_flow_config()).extract(ids, response_mask=resp)
    fast = FlowExtractor(model, tiny_flow_config(basis_solver="subspace")).extract(ids, response_mask=resp)
    assert torch.equal(exact.valid, fast.valid)
    torch.testing.assert_close(fast.values, exact.values, atol=2e-3, rtol=2e-3)


def test_competitor_candidates_over_the_whole_vocabulary_are_exact():
    model = make_tiny_model("llama")
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 90, (2, 14), generator=gen)
    resp = torch.zeros_like(ids)
    resp[:, 5:] = 1
    vocab = model.get_output_embeddings().weight.shape[0]
    exact = FlowExtractor(model, tiny_flow_config()).extract(ids, response_mask=resp)
    whole = FlowExtractor(model, tiny_flow_config(competitor_candidates=vocab)).extract(ids, response_mask=resp)
    torch.testing.assert_close(whole.values, exact.values, atol=1e-5, rtol=1e-5)
    few = FlowExtractor(model, tiny_flow_config(competitor_candidates=6)).extract(ids, response_mask=resp)
    assert torch.equal(few.valid, exact.valid) and bool(few.values[few.valid].isfinite().all())
    assert not torch.allclose(few.values[few.valid], exact.values[exact.valid])  # an approximation, not the spec


def test_generate_capture_equals_replay_with_competitor_candidates():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config(competitor_candidates=6))
    gen = torch.Generator().manual_seed(3)
    ids, att = _left_padded(gen, [6, 4])
    prompt_len = ids.shape[1]
    out, feats = capture_generate(ext, ids, attention_mask=att, max_new_tokens=6, do_sample=False, pad_token_id=0)
    resp = torch.zeros_like(out)
    resp[:, prompt_len:] = 1
    replay = ext.extract(out, torch.cat([att, torch.ones_like(out[:, prompt_len:])], dim=1), resp)
    torch.testing.assert_close(feats.values, replay.values, atol=1e-4, rtol=1e-4)


def test_peft_lora_model():
    peft = pytest.importorskip("peft")
    model = make_tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).eval()
    ext = FlowExtractor(lora, tiny_flow_config())
    _out, f = capture_generate(ext, torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert f.valid.any() and torch.isfinite(f.values).all()


def test_subspace_larger_than_hidden_refused():
    with pytest.raises(ValueError, match="subspace_dim=64"):
        FlowExtractor(make_tiny_model("llama"), FlowConfig(subspace_dim=64))


def test_streaming_check_finds_a_non_finite_state_of_a_later_token():
    from conftest import tiny_wrapped

    fc = tiny_wrapped("llama")
    calls = {"n": 0}

    def poison(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 4:  # the third generated token's forward: earlier checks saw finite states
            out = out.clone()
            out[0, -1] = float("nan")
        return out

    handle = fc.extractor.arch.mlp_modules[1].register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteStateError, match="MLP output of block 1"):
            fc.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                        flow_check_every=1, suppress_tokens=[98])  # fmt: skip
    finally:
        handle.remove()
    assert calls["n"] >= 4
    for blk in fc.extractor.arch.blocks:
        assert not blk._forward_hooks and not blk._forward_pre_hooks


def test_rows_of_is_a_view_for_evenly_spaced_runs_and_a_copy_otherwise():
    buf = torch.arange(40.0).view(20, 2)
    for idx, view in (([3, 4, 5, 6], True), ([1, 9, 17], True), ([7], True), ([2, 3, 5], False), ([5, 4], False)):
        idx = torch.tensor(idx)
        got = rows_of(buf, idx)
        assert torch.equal(got, buf[idx])
        assert (got.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()) is view
    assert rows_of(buf, torch.zeros(0, dtype=torch.long)).shape == (0, 2)
