"""Flow-guided refinement (spec §7): the block clamp's invariants, rollback parity, hook hygiene, errors."""

import copy

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config, tiny_validator
from torch import nn

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.clamp import BlockClamp
from hf_flowcheck.detectors.flow_validator import FlowValidator, ValidatorConfig
from hf_flowcheck.errors import RefinementError
from hf_flowcheck.refinement import FlowRefineOutput, RefineConfig, refine

FAMS = ["llama", "gemma2"]
#: Small-model settings: k and K must fit hidden 32 / vocab 99; the tiny models are kept off EOS.
SMALL = dict(subspace_dim=4, num_competitors=4, n_cal=4, suppress_tokens=[98])


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4, 3, 2]])
    att = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    return ids, att


@pytest.fixture(scope="module", params=FAMS)
def setup(request):
    model = make_tiny_model(request.param)
    fc = FlowCheckedModelForCausalLM(model, tiny_validator(model))
    ids, att = _batch()
    out = fc.generate(
        input_ids=ids,
        attention_mask=att,
        max_new_tokens=8,
        do_sample=False,
        return_flow_scores=True,
        suppress_tokens=[98],
    )
    return fc, out, att


@torch.no_grad()
def _block_outputs(model, blocks, ids, clamp=None):
    """Outputs ``[B, S, d]`` of every block for a teacher-forced forward (optionally patched)."""
    got = {}

    def run():
        # Registered after the clamp, so these hooks see the patched outputs.
        handles = [
            blk.register_forward_hook(lambda m, a, o, b=b: got.__setitem__(b, (o[0] if isinstance(o, tuple) else o)[0]))
            for b, blk in enumerate(blocks)
        ]
        try:
            return model(ids).logits
        finally:
            for h in handles:
                h.remove()

    if clamp is None:
        logits = run()
    else:
        with clamp:
            logits = run()
    return torch.stack([got[b] for b in range(len(blocks))]), logits


def _orthonormal(d, k, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))
    return q


def _no_hooks(fc):
    for blk in fc.extractor.arch.blocks:
        assert not blk._forward_hooks and not blk._forward_pre_hooks


# --------------------------------------------------------------------------------- the clamp
@pytest.mark.parametrize("family", FAMS)
def test_patch_touches_only_block_b0_at_positions_from_t0(family):
    model = make_tiny_model(family)
    blocks = FlowCheckedModelForCausalLM(model).extractor.arch.blocks
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13]])
    b0, t0 = 1, 4
    u = _orthonormal(32, 4)
    ref, ref_logits = _block_outputs(model, blocks, ids)
    clamp = BlockClamp(blocks[b0], t0, basis=u, s_ref=1e-3, alpha=1.05)
    got, logits = _block_outputs(model, blocks, ids, clamp)
    assert not clamp.active
    # Blocks before b0: identical everywhere; every block: identical before t0.
    torch.testing.assert_close(got[:b0], ref[:b0], rtol=0, atol=0)
    torch.testing.assert_close(got[:, :t0], ref[:, :t0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits[:, :t0], ref_logits[:, :t0], rtol=1e-6, atol=1e-6)
    # Block b0 changes at every position >= t0, but only inside span(U).
    diff = got[b0, t0:] - ref[b0, t0:]
    assert (diff.norm(dim=-1) > 1e-6).all()
    orth = diff - (diff @ u) @ u.T
    assert orth.abs().max() < 1e-6
    # The clamped step norm is alpha * s_ref.
    h_in = ref[b0 - 1, t0:]
    dp_new = (got[b0, t0:] - h_in) @ u
    torch.testing.assert_close(dp_new.norm(dim=-1), torch.full((ids.shape[1] - t0,), 1.05e-3), rtol=1e-3, atol=1e-6)
    st = clamp.stats
    assert st.positions_patched == ids.shape[1] - t0 == st.positions_clamped
    assert all(0 <= lam <= 1 for lam in st.lambdas)


def test_lambda_never_exceeds_one_and_large_alpha_is_identity():
    model = make_tiny_model("llama")
    blocks = FlowCheckedModelForCausalLM(model).extractor.arch.blocks
    ids = torch.randint(2, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    ref, _ = _block_outputs(model, blocks, ids)
    for alpha in (1e-3, 0.5, 1.05, 3.0):
        clamp = BlockClamp(blocks[2], 3, basis=_orthonormal(32, 4), s_ref=0.01, alpha=alpha)
        _block_outputs(model, blocks, ids, clamp)
        assert clamp.stats.positions_patched == 2 * 9  # both rows share the positions
        assert max(clamp.stats.lambdas) <= 1.0
    clamp = BlockClamp(blocks[2], 3, basis=_orthonormal(32, 4), s_ref=0.01, alpha=1e9)
    got, _ = _block_outputs(model, blocks, ids, clamp)
    assert clamp.stats.positions_clamped == 0 and clamp.stats.mean_lambda == 1.0
    assert torch.equal(got, ref)


def test_calibrated_s_ref_is_the_median_over_the_span():
    model = make_tiny_model("gemma2")
    blocks = FlowCheckedModelForCausalLM(model).extractor.arch.blocks
    ids = torch.randint(2, 97, (1, 10), generator=torch.Generator().manual_seed(2))
    ref, _ = _block_outputs(model, blocks, ids)
    u = _orthonormal(32, 4, seed=3)
    clamp = BlockClamp(blocks[2], 7, basis=u, alpha=1.05, calibration_start=2)
    _block_outputs(model, blocks, ids, clamp)
    norms = ((ref[2, 2:7] - ref[1, 2:7]) @ u).norm(dim=-1)
    assert clamp.stats.n_cal_used == 5
    assert clamp.stats.s_ref == pytest.approx(float(torch.quantile(norms, 0.5)), rel=1e-5)


def test_positions_are_tracked_across_decode_steps():
    model = make_tiny_model("llama")
    blocks = FlowCheckedModelForCausalLM(model).extractor.arch.blocks
    ids = torch.randint(2, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    u = _orthonormal(32, 4)
    with BlockClamp(blocks[1], 5, basis=u, s_ref=1e-4, calibration_start=0):
        full = model(ids).logits
    clamp = BlockClamp(blocks[1], 5, basis=u, s_ref=1e-4, start=0)
    steps = []
    with clamp:
        out = model(ids[:, :3], use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
        for i in range(3, ids.shape[1]):
            out = model(ids[:, i : i + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert clamp.stats.positions_patched == 4


class _DoublingBlock(nn.Module):
    """A residual-shaped block that returns a tuple, as transformers' decoder layers do."""

    def forward(self, x):
        return (2 * x, "extra")


def test_tuple_output_stays_a_tuple():
    blk = _DoublingBlock()
    x = torch.randn(1, 5, 8)
    with BlockClamp(blk, 2, basis=_orthonormal(8, 2), s_ref=0.0, alpha=1.0) as clamp:
        y = blk(x)
    assert isinstance(y, tuple) and y[1] == "extra"
    assert torch.equal(y[0][:, :2], 2 * x[:, :2])
    assert clamp.stats.positions_clamped == 3
    with pytest.raises(ValueError, match="basis"):
        BlockClamp(blk, 2)
    with pytest.raises(ValueError, match="alpha"):
        BlockClamp(blk, 2, basis=_orthonormal(8, 2), alpha=0)


# ---------------------------------------------------------------------------------- refine()
def test_huge_alpha_equals_plain_rollback(setup):
    fc, out, att = setup
    flow = fc.refine(out, strategy="flow", alpha=1e9, threshold=0.0, attention_mask=att, **SMALL)
    plain = fc.refine(out, strategy="regenerate", threshold=0.0, attention_mask=att, **SMALL)
    assert flow.row_indices == plain.row_indices == [0, 1]
    for a, b in zip(flow.rows, plain.rows):
        assert a.refined_ids == b.refined_ids
        assert a.positions_patched > 0 and a.positions_clamped == 0 and a.max_lambda == 1.0
        assert a.patched_block == a.culprit_before[1] and b.patched_block is None
        assert a.score_after == pytest.approx(b.score_after, abs=1e-5)
        # Greedy rollback with no clamp reproduces the original answer.
        assert b.refined_ids == b.original_ids
        assert b.score_after == pytest.approx(b.score_before, abs=1e-5)


def test_cached_prefix_equals_replayed_prefix(setup):
    fc, out, att = setup
    kw = dict(strategy="flow", alpha=0.3, threshold=0.0, attention_mask=att, **SMALL)
    cached = fc.refine(out, **kw)
    replay = fc.refine(out, use_cache_prefix=False, **kw)
    for a, b in zip(cached.rows, replay.rows):
        assert a.cache_reused and not b.cache_reused
        assert a.refined_ids == b.refined_ids
        assert a.score_after == pytest.approx(b.score_after, abs=1e-4)
        assert a.s_ref == pytest.approx(b.s_ref, rel=1e-4)
        assert a.n_cal_used == b.n_cal_used == 4
        assert a.positions_clamped == b.positions_clamped > 0
        assert a.forward_tokens < b.forward_tokens
        # Cached: n_cal + 1 positions in the first call, then one per further new token.
        assert a.forward_tokens == SMALL["n_cal"] + 1 + a.max_new_tokens - 1


def test_fixed_budget_and_answer_shape(setup):
    fc, out, att = setup
    res = fc.refine(out, strategy="flow", alpha=0.1, threshold=0.0, attention_mask=att, **SMALL)
    budget = out.sequences.shape[1] - out.prompt_length
    for r in res.rows:
        t0 = r.culprit_before[0]
        kept = t0 + 1 - out.prompt_length
        assert r.max_new_tokens == budget - kept
        assert len(r.refined_answer_ids) == budget  # EOS is suppressed, so the full budget is used
        assert r.refined_answer_ids[:kept] == r.original_answer_ids[:kept]
        assert 0 < r.cost_ratio < 1 and r.wall_time_s > 0
        assert r.score_after == r.score_after  # not nan


def test_rollback_culprit_draws_the_culprit_token_again(setup):
    fc, out, att = setup
    kw = dict(threshold=0.0, attention_mask=att, **SMALL)
    after = fc.refine(out, strategy="flow", alpha=0.1, **kw)
    at = fc.refine(out, strategy="flow", alpha=0.1, rollback="culprit", **kw)
    plain = fc.refine(out, strategy="regenerate", rollback="culprit", **kw)
    budget = out.sequences.shape[1] - out.prompt_length
    for a, b, g in zip(after.rows, at.rows, plain.rows):
        t0 = int(out.flow_culprits[a.row, 0])
        assert a.culprit_before[0] == t0 and b.culprit_before[0] == g.culprit_before[0] == t0 - 1
        assert a.culprit_before[1] == b.culprit_before[1] == b.patched_block
        kept = t0 - out.prompt_length  # answer tokens before the culprit; the culprit token is drawn again
        assert b.max_new_tokens == budget - kept == a.max_new_tokens + 1
        assert b.refined_answer_ids[:kept] == b.original_answer_ids[:kept]
        assert b.positions_patched > a.positions_patched  # the clamp starts one position earlier
        assert g.refined_ids == g.original_ids  # greedy, no clamp: the same answer again


def test_left_padded_row_equals_the_unpadded_prompt():
    model = make_tiny_model("llama")
    fc = FlowCheckedModelForCausalLM(model, tiny_validator(model))
    ids, att = _batch()
    kw = dict(max_new_tokens=8, do_sample=False, return_flow_scores=True, suppress_tokens=[98])
    batched = fc.generate(input_ids=ids, attention_mask=att, **kw)
    alone = fc.generate(input_ids=ids[:1, 2:], **kw)
    assert batched.flow_culprits[0, 0] - 2 == alone.flow_culprits[0, 0]
    a = fc.refine(batched, rows=[0], alpha=0.3, attention_mask=att, **SMALL).rows[0]
    b = fc.refine(alone, rows=[0], alpha=0.3, **SMALL).rows[0]
    assert a.prompt_length == b.prompt_length == 6
    assert a.original_ids == b.original_ids and a.refined_ids == b.refined_ids
    assert a.score_after == pytest.approx(b.score_after, abs=1e-4)
    # Without any attention mask (neither given nor kept on the output), leading pad tokens are taken as padding.
    batched.prompt_attention_mask = None
    c = fc.refine(batched, rows=[0], alpha=0.3, **SMALL).rows[0]
    assert c.prompt_length == 6 and c.refined_ids == a.refined_ids


def test_no_patch_left_after_refine_or_error(setup):
    fc, out, att = setup
    probe = torch.tensor([[3, 4, 5, 6, 7, 8]])
    before = fc(probe).logits
    cache_len = out.past_key_values.get_seq_length()
    keys0 = out.past_key_values.layers[0].keys.clone()
    fc.refine(out, strategy="random_depth", alpha=0.1, threshold=0.0, attention_mask=att, seed=3, **SMALL)
    _no_hooks(fc)
    assert torch.equal(fc(probe).logits, before)

    from transformers import LogitsProcessor, LogitsProcessorList

    class Boom(LogitsProcessor):
        def __init__(self):
            self.calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return scores

    with pytest.raises(RuntimeError, match="boom"):
        fc.refine(
            out, alpha=0.1, threshold=0.0, attention_mask=att, logits_processor=LogitsProcessorList([Boom()]), **SMALL
        )
    _no_hooks(fc)
    assert torch.equal(fc(probe).logits, before)
    # The user's cache is untouched.
    assert out.past_key_values.get_seq_length() == cache_len
    assert torch.equal(out.past_key_values.layers[0].keys, keys0)


def test_random_depth_is_seeded(setup):
    fc, out, att = setup
    kw = dict(strategy="random_depth", alpha=0.3, threshold=0.0, attention_mask=att, **SMALL)
    a = fc.refine(out, seed=7, **kw)
    b = fc.refine(out, seed=7, **kw)
    assert [r.patched_block for r in a.rows] == [r.patched_block for r in b.rows]
    assert all(0 <= r.patched_block < 4 for r in a.rows)
    assert [r.refined_ids for r in a.rows] == [r.refined_ids for r in b.rows]


def test_row_selection(setup):
    fc, out, att = setup
    assert len(fc.refine(out, threshold=1.0, attention_mask=att, **SMALL).rows) == 0
    res = fc.refine(out, rows=[1], attention_mask=att, **SMALL)
    assert isinstance(res, FlowRefineOutput) and res.row_indices == [1]
    assert res.scores_before.shape == res.scores_after.shape == (1,)
    assert res.refined_sequences(0).shape[0] == 1
    with pytest.raises(ValueError, match="rows contains 5"):
        fc.refine(out, rows=[5], **SMALL)


def test_refine_returns_the_whole_batch_like_generate(setup):
    fc, out, att = setup
    res = fc.refine(out, rows=[1], attention_mask=att, **SMALL)
    p = out.prompt_length
    assert res.sequences.shape[0] == out.sequences.shape[0] and res.prompt_length == p
    assert res.refined.tolist() == [False, True]
    torch.testing.assert_close(res.sequences[:, :p], out.sequences[:, :p])  # prompts (and their pads) untouched
    row0 = out.sequences[0, p:].tolist()
    assert res.sequences[0, p : p + len(row0)].tolist() == row0  # an unrefined row keeps its answer
    assert res.sequences[1, p : p + len(res.rows[0].refined_answer_ids)].tolist() == res.rows[0].refined_answer_ids
    assert float(res.flow_scores[0]) == float(out.flow_scores[0])
    assert float(res.flow_scores[1]) == res.rows[0].score_after or res.flow_scores[1].isnan()
    torch.testing.assert_close(res.flow_scores_before, out.flow_scores.float().cpu())
    # The prompt mask travels with the output: no attention_mask needed, same result.
    again = fc.refine(out, rows=[1], **SMALL)
    assert again.sequences.tolist() == res.sequences.tolist()


def test_refine_config_validates_and_round_trips():
    cfg = RefineConfig(strategy="random_depth", alpha=0.5, seed=3)
    assert RefineConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in (
        ({"alpha": 0}, "alpha=0 must be positive"),
        ({"alpha": -1.0}, "alpha=-1.0 must be positive"),
        ({"n_cal": 0}, "n_cal=0 must be a positive integer"),
        ({"strategy": "x"}, "strategy='x' is not supported"),
        ({"threshold": 2}, r"threshold=2 must be a number in \[0, 1\]"),
        ({"seed": 1.5}, "seed=1.5 must be an integer"),
        ({"band": -1}, "band=-1 must be an integer >= 0"),
        ({"clamp_positions": 0}, "clamp_positions=0 must be a positive integer"),
        ({"num_culprits": 0}, "num_culprits=0 must be a positive integer"),
        ({"rescore": False, "num_culprits": 2}, "rescore=False cannot be combined with num_culprits=2"),
        ({"rescore": 1}, "rescore=1 must be True or False"),
        ({"rollback": "before"}, "rollback='before' is not supported"),
    ):
        with pytest.raises(ValueError, match=match):
            RefineConfig(**bad)
    with pytest.raises(ValueError, match="Unknown RefineConfig field"):
        RefineConfig.from_dict({"beta": 1})
    new_fields = ("band", "clamp_positions", "num_culprits", "rescore", "rollback")
    old = {k: v for k, v in cfg.to_dict().items() if k not in new_fields}
    assert RefineConfig.from_dict({**old, "format_version": 1}) == cfg  # format 1 dicts still load
    two = {k: v for k, v in cfg.to_dict().items() if k != "rollback"}
    assert RefineConfig.from_dict({**two, "format_version": 2}).rollback == "after_culprit"  # spec §7


# ------------------------------------------------------------------ the operator's options
def test_band_clamps_the_blocks_around_the_culprit_block(setup):
    fc, out, att = setup
    one = fc.refine(out, alpha=0.3, threshold=0.0, attention_mask=att, **SMALL).rows
    band = fc.refine(out, alpha=0.3, band=1, threshold=0.0, attention_mask=att, **SMALL).rows
    n_blocks = fc.extractor.arch.num_blocks
    for a, b in zip(one, band):
        b0 = a.culprit_before[1]
        assert a.patched_blocks == (b0,)
        assert b.patched_blocks == tuple(range(max(0, b0 - 1), min(n_blocks, b0 + 2)))
        # s_ref is the centre block's; its basis may differ (the block below it is clamped at t0 too).
        assert b.patched_block == b0 and b.s_ref == b.s_ref
        assert b.positions_patched == len(b.patched_blocks) * a.positions_patched
    # A huge band clamps every block, and still leaves no hook behind.
    every = fc.refine(out, alpha=0.3, band=99, rows=[0], attention_mask=att, **SMALL).rows[0]
    assert every.patched_blocks == tuple(range(n_blocks))
    _no_hooks(fc)


def test_clamp_positions_stops_the_clamp(setup):
    fc, out, att = setup
    full = fc.refine(out, alpha=0.3, threshold=0.0, attention_mask=att, **SMALL).rows
    short = fc.refine(out, alpha=0.3, clamp_positions=1, threshold=0.0, attention_mask=att, **SMALL).rows
    for a, b in zip(full, short):
        assert b.positions_patched == 1 < a.positions_patched or a.positions_patched == 1
        # The first regenerated token is decided under the same clamp either way.
        kept = a.culprit_before[0] + 1 - out.prompt_length
        assert b.refined_answer_ids[: kept + 1] == a.refined_answer_ids[: kept + 1]
    blk = _DoublingBlock()
    with BlockClamp(blk, 1, basis=_orthonormal(8, 2), s_ref=0.0, alpha=1.0, stop=3) as clamp:
        y = blk(torch.randn(1, 5, 8))[0]
    assert clamp.stats.positions_patched == 2
    with pytest.raises(ValueError, match="stop=1 must lie after t0=1"):
        BlockClamp(blk, 1, basis=_orthonormal(8, 2), stop=1)
    assert y.shape == (1, 5, 8)


def test_num_culprits_keeps_the_lowest_scoring_candidate(setup):
    fc, out, att = setup
    one = fc.refine(out, alpha=0.3, rows=[1], attention_mask=att, **SMALL).rows[0]
    three = fc.refine(out, alpha=0.3, num_culprits=3, rows=[1], attention_mask=att, **SMALL).rows[0]
    assert three.candidates == 3 and one.candidates == 1
    assert three.score_after <= one.score_after + 1e-6  # the culprit itself is the first candidate
    assert three.forward_tokens > one.forward_tokens
    # Candidates are distinct answer tokens; each one refined alone gives one of the kept results.
    p = out.prompt_length
    ev = out.flow_event_scores[1].max(0).values
    assert int((ev > -float("inf")).sum()) >= 3
    assert three.culprit_before[0] >= p


def test_further_candidates_are_the_next_riskiest_tokens_at_their_top_block():
    from types import SimpleNamespace

    from hf_flowcheck.refinement import _candidates

    inf = float("inf")
    # columns: a prompt token, then four answer tokens (positions 10-13); by risk 12, 11, 13, 10
    events = torch.tensor([[0.0, 5.0, -1.0, 0.5, 2.0], [1.0, -2.0, 0.0, 3.0, -inf]])  # [B=2, T=5]
    out = SimpleNamespace(
        flow_culprits=torch.tensor([[12, 1]]),
        flow_event_scores=events[None],
        flow_positions=torch.tensor([[9, 10, 11, 12, 13]]),
        flow_token_scores=torch.tensor([[0.99, 0.3, 0.6, 0.9, 0.5]]),
    )
    got = _candidates(out, 0, 10, RefineConfig(num_culprits=4))
    # the culprit first, then tokens by risk (not by their largest event: 10 has the largest), each at
    # the block of its largest event; the prompt column never
    assert got == [(12, 1), (11, 1), (13, 0), (10, 0)]
    # punctuation (column 2, position 11) is passed over as the culprit rule passes it over
    words = torch.tensor([True, True, False, True, True])
    assert _candidates(out, 0, 10, RefineConfig(num_culprits=4), words) == [(12, 1), (13, 0), (10, 0)]
    # an answer of punctuation only keeps every token a candidate
    assert _candidates(out, 0, 10, RefineConfig(num_culprits=2), torch.zeros(5, dtype=torch.bool)) == got[:2]


def test_resample_draws_the_whole_answer_again(setup):
    fc, out, att = setup
    res = fc.refine(out, strategy="resample", threshold=0.0, attention_mask=att, **SMALL)
    for r in res.rows:
        assert r.patched_block is None and r.patched_blocks == () and r.positions_patched == 0
        assert r.culprit_before == (out.prompt_length - 1, -1)
        # Greedy: the whole answer comes out the same, from the prompt alone.
        assert r.refined_ids == r.original_ids
        assert r.max_new_tokens == out.sequences.shape[1] - out.prompt_length
        assert r.score_after == pytest.approx(r.score_before, abs=1e-4)
    sampled = fc.refine(
        out, strategy="resample", rows=[1], num_culprits=2, attention_mask=att, do_sample=True, seed=0, **SMALL
    )
    again = fc.refine(
        out, strategy="resample", rows=[1], num_culprits=2, attention_mask=att, do_sample=True, seed=0, **SMALL
    )
    assert sampled.rows[0].candidates == 2
    fast = fc.refine(out, strategy="resample", rows=[1], attention_mask=att, rescore=False, **SMALL).rows[0]
    assert fast.score_after != fast.score_after and fast.culprit_after == (-1, -1)
    assert fast.refined_ids == res.rows[-1].refined_ids
    assert sampled.rows[0].refined_ids == again.rows[0].refined_ids  # seeded


# ---------------------------------------------------------------------------------- bad inputs
def test_output_without_flow_scores_is_refused(setup):
    fc, out, att = setup
    ids, att = _batch()
    plain = fc.base_model.generate(input_ids=ids, attention_mask=att, max_new_tokens=3, return_dict_in_generate=True)
    with pytest.raises(RefinementError, match="return_flow_scores=True"):
        refine(fc.base_model, fc.extractor, fc.validator, plain)
    with pytest.raises(ValueError, match="strategy='clamp'"):
        fc.refine(out, strategy="clamp")
    with pytest.raises(ValueError, match="subspace_dim=64"):
        fc.refine(out, subspace_dim=64)
    with pytest.raises(ValueError, match=r"no validator|needs a validator"):
        FlowCheckedModelForCausalLM(fc.base_model, None, tiny_flow_config()).refine(out)


def _doctored(out, **fields):
    import copy

    new = copy.copy(out)
    for k, v in fields.items():
        setattr(new, k, v)
    return new


def test_culprit_in_prompt_and_rows_without_events_are_skipped(setup):
    fc, out, att = setup
    culprits = out.flow_culprits.clone()
    culprits[0, 0] = 3  # inside the prompt
    has = out.flow_has_events.clone()
    has[1] = False
    doc = _doctored(out, flow_culprits=culprits, flow_has_events=has)
    res = fc.refine(doc, rows=[0, 1], attention_mask=att, **SMALL)
    assert len(res.rows) == 0
    assert "lies in the prompt" in res.skipped[0]
    assert "no scored token" in res.skipped[1]


def test_culprit_at_last_position_regenerates_one_token(setup):
    fc, out, att = setup
    culprits = out.flow_culprits.clone()
    last = out.sequences.shape[1] - 1
    culprits[:, 0] = last
    doc = _doctored(out, flow_culprits=culprits)
    res = fc.refine(doc, threshold=0.0, alpha=0.1, attention_mask=att, **SMALL)
    budget = out.sequences.shape[1] - out.prompt_length
    for r in res.rows:
        assert r.max_new_tokens == 1 and "past the budget" in r.note
        assert len(r.refined_answer_ids) == budget + 1
        assert r.refined_answer_ids[:budget] == r.original_answer_ids[:budget]


def test_short_prefix_uses_what_exists(setup):
    fc, out, att = setup
    res = fc.refine(out, threshold=0.0, attention_mask=att, **{**SMALL, "n_cal": 64})
    for r in res.rows:
        t0_row = r.prompt_length + r.culprit_before[0] - out.prompt_length
        assert r.n_cal_used == t0_row < 64
        assert not r.cache_reused  # the whole prefix is the calibration span: nothing to reuse


def test_no_generated_tokens_is_skipped(setup):
    fc, out, _ = setup
    doc = _doctored(out, sequences=out.sequences[:, : out.prompt_length])
    res = fc.refine(doc, rows=[0], **SMALL)
    assert len(res.rows) == 0 and "no generated tokens" in res.skipped[0]


# ------------------------------------------------------------------------------------ real model
@pytest.mark.slow
@pytest.mark.real_model
def test_refine_real_model_end_to_end(smollm2):
    from hf_flowcheck import FlowConfig

    model, tok = smollm2
    cfg = FlowConfig()
    torch.manual_seed(0)
    v = FlowValidator(
        ValidatorConfig.from_feature_names(cfg.feature_names, hidden=16, embed=8, gru_hidden=8), flow_config=cfg
    )
    v.set_base_model(model)
    fc = FlowCheckedModelForCausalLM(model, v.eval(), tokenizer=tok)
    enc = tok(
        ["Question: What is the capital of France?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer:"],
        return_tensors="pt",
        padding=True,
    )
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    out = fc.generate(**enc, max_new_tokens=12, return_flow_scores=True, **kw)
    probe = fc(enc.input_ids[1:]).logits
    res = fc.refine(out, threshold=0.0, attention_mask=enc.attention_mask, **kw)
    flagged = out.flow_has_events.nonzero().squeeze(-1).tolist()
    assert flagged and res.row_indices == flagged
    r = res.rows[0]
    assert r.patched_block == r.culprit_before[1] and r.s_ref > 0 and r.max_lambda <= 1.0
    assert r.positions_patched >= 1 and r.n_cal_used >= 1
    assert len(r.refined_answer_ids) <= out.sequences.shape[1] - out.prompt_length
    assert r.score_after != r.score_after or 0 <= r.score_after <= 1
    # With a calibration span shorter than the prefix, the generated cache is reused.
    short = fc.refine(out, rows=[r.row], n_cal=4, attention_mask=enc.attention_mask, **kw)
    assert short.rows[0].cache_reused and short.rows[0].n_cal_used == 4
    _no_hooks(fc)
    assert torch.equal(fc(enc.input_ids[1:]).logits, probe)


@pytest.mark.parametrize("bad", [5, -1, float("nan"), True])
def test_threshold_and_budget_are_validated(setup, bad):
    fc, out, att = setup
    with pytest.raises(ValueError, match=r"threshold=.* must be a number in \[0, 1\]"):
        fc.refine(out, threshold=bad, attention_mask=att, **SMALL)
    with pytest.raises(ValueError, match="max_new_tokens=-3"):
        fc.refine(out, max_new_tokens=-3, attention_mask=att, **SMALL)


def test_tampered_culprit_is_skipped_with_its_reason(setup):
    fc, out, att = setup
    bad = copy.copy(out)
    bad.flow_culprits = out.flow_culprits.clone()
    bad.flow_culprits[0, 1] = 999
    bad.flow_culprits[1, 0] = 10_000
    res = fc.refine(bad, rows=[0, 1], attention_mask=att, **SMALL)
    assert "b0=999 does not exist" in res.skipped[0]
    assert "beyond the sequence" in res.skipped[1]


def test_generate_and_refine_read_the_cache_without_the_deprecated_name(setup, caplog):
    """transformers >= 5.2x renamed the output's ``past_key_values`` to ``cache`` and logs on the old name."""
    import logging

    import transformers.utils.logging as hf_logging

    fc, _, _ = setup
    hf_logging.warning_once.cache_clear()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            ids, att2 = _batch()
            again = fc.generate(input_ids=ids, attention_mask=att2, max_new_tokens=4, return_flow_scores=True)
            res = fc.refine(again, threshold=0.0, alpha=0.3, attention_mask=att2, **SMALL)
    finally:
        hf_logging.disable_propagation()
    assert res.rows and all(r.cache_reused for r in res.rows)
    assert not [r for r in caplog.records if "deprecated" in r.getMessage()], caplog.text
