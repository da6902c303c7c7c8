"""Token-level risk while generating: FlowTextStreamer, rollback inside generate, their bad inputs."""

import threading

import pytest
import torch
from conftest import tiny_wrapped
from test_baselines import CharTokenizer

from hf_flowcheck import FlowStreamChunk, FlowTextStreamer

PROMPT = torch.tensor([[5, 6, 7, 8, 9, 10]])
KW = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[98])


@pytest.fixture(scope="module")
def fc():
    return tiny_wrapped("llama")


def _no_hooks(fc):
    for blk in fc.extractor.arch.blocks:
        assert not blk._forward_hooks and not blk._forward_pre_hooks


def test_chunks_carry_text_running_scores_and_token_risks(fc):
    tok = CharTokenizer()
    streamer = FlowTextStreamer(tok)
    out = fc.generate(input_ids=PROMPT, streamer=streamer, return_flow_scores=True, **KW)
    chunks = streamer.chunks
    answer = out.sequences[0, PROMPT.shape[1] :].tolist()
    assert all(isinstance(c, FlowStreamChunk) for c in chunks) and chunks[-1].final
    assert [t for c in chunks for t in c.token_ids] == answer
    assert "".join(c.text for c in chunks) == tok.decode(answer) == streamer.text
    # Checked every token by default; each chunk before the last carries that check's running score.
    assert out.flow_check_steps.tolist() == list(range(1, len(answer)))
    running = out.flow_running_scores[:, 0].tolist()
    assert [c.score for c in chunks[:-1]] == pytest.approx(running, abs=1e-6)
    assert chunks[-1].score == pytest.approx(float(out.flow_scores[0]), abs=1e-6)
    # The final chunk's risks are the returned per-token scores.
    final_risk = out.flow_token_scores[0]
    pos = out.flow_positions[0]
    last = chunks[-1]
    start = len(answer) - len(last.token_ids)
    for i, r in enumerate(last.token_risks):
        col = (pos == PROMPT.shape[1] + start + i).nonzero()
        if col.numel():
            assert r == pytest.approx(float(final_risk[col[0, 0]]), abs=1e-6)
    assert all(len(c.token_risks) == len(c.token_ids) for c in chunks)
    assert all(0.0 <= r <= 1.0 for c in chunks for r in c.token_risks if r == r)
    _no_hooks(fc)


def test_check_every_two_emits_every_two_tokens(fc):
    streamer = FlowTextStreamer(CharTokenizer())
    out = fc.generate(input_ids=PROMPT, streamer=streamer, flow_check_every=2, **KW)
    sizes = [len(c.token_ids) for c in streamer.chunks]
    assert sizes[:-1] == [2] * (len(sizes) - 1) and sum(sizes) == out.sequences.shape[1] - PROMPT.shape[1]


def test_a_consumer_thread_iterates_while_generate_runs(fc):
    streamer = FlowTextStreamer(CharTokenizer(), timeout=60)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=fc.generate(input_ids=PROMPT, streamer=streamer, **KW)))
    worker.start()
    got = list(streamer)
    worker.join()
    assert got == streamer.chunks and got[-1].final
    assert got[-1].score == pytest.approx(float(result["out"].flow_scores[0]), abs=1e-6)


def test_a_failing_consumer_stops_generate_and_leaves_no_hook(fc):
    def boom(chunk):
        raise KeyboardInterrupt("consumer stopped")

    streamer = FlowTextStreamer(CharTokenizer(), on_chunk=boom)
    with pytest.raises(KeyboardInterrupt):
        fc.generate(input_ids=PROMPT, streamer=streamer, **KW)
    _no_hooks(fc)
    with pytest.raises(RuntimeError, match="generate\\(\\) failed while streaming"):
        list(streamer)  # an iterating consumer is released, not left waiting


def test_cancel_stops_generation_early(fc):
    streamer = FlowTextStreamer(CharTokenizer(), on_chunk=lambda c: streamer.cancel())
    out = fc.generate(input_ids=PROMPT, streamer=streamer, **KW)
    assert out.sequences.shape[1] - PROMPT.shape[1] < KW["max_new_tokens"]
    assert streamer.chunks[-1].final
    _no_hooks(fc)


def test_plain_generate_streams_text_without_scores(fc):
    streamer = FlowTextStreamer(CharTokenizer())
    seqs = fc.base_model.generate(input_ids=PROMPT, streamer=streamer, **KW)
    assert "".join(c.text for c in streamer) == CharTokenizer().decode(seqs[0, PROMPT.shape[1] :])
    assert all(c.score != c.score for c in streamer.chunks)


# ------------------------------------------------------------------------------- rollback
def test_rollback_refines_the_rows_that_cross(fc):
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10], [9, 8, 7, 6, 5, 4, 3, 2]])
    att = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    kw = dict(input_ids=ids, attention_mask=att, **KW)
    none = fc.generate(flow_check_every=1, flow_rollback_threshold=1.0, **kw)
    plain = fc.generate(return_flow_scores=True, **kw)
    assert not none.flow_rolled_back.any() and torch.equal(none.sequences, plain.sequences)
    every = fc.generate(flow_check_every=1, flow_rollback_threshold=0.0, return_flow_features=True, **kw)
    assert every.flow_rolled_back.all() and not every.flow_abstained.any()
    assert every.past_key_values is None and len(every.flow_refinement.rows) == 2
    for r in every.flow_refinement.rows:
        assert r.patched_block == r.culprit_before[1] and r.positions_patched > 0
    # Every flow field belongs to the returned sequences: a teacher-forced re-score agrees.
    p = ids.shape[1]
    seqs = every.sequences
    resp = torch.zeros_like(seqs)
    resp[:, p:] = 1
    full_att = torch.cat([att, torch.ones_like(seqs[:, p:])], dim=1)
    again = fc.validator.score_features(fc.extractor.extract(seqs, full_att, resp))
    torch.testing.assert_close(every.flow_scores, again.scores, atol=1e-5, rtol=1e-5)
    assert every.flow_features.values.shape[0] == 2
    _no_hooks(fc)


def test_max_rollbacks_tries_several_culprits(fc):
    out = fc.generate(input_ids=PROMPT, flow_check_every=3, flow_rollback_threshold=0.0, flow_max_rollbacks=2, **KW)
    assert out.flow_refinement.rows[0].candidates == 2
    _no_hooks(fc)


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"flow_rollback_threshold": 0.5}, "flow_rollback_threshold needs flow_check_every"),
        ({"flow_check_every": 1, "flow_rollback_threshold": 1.5}, r"flow_rollback_threshold=1.5 must be a number in"),
        ({"flow_check_every": 1, "flow_rollback_threshold": "low"}, "'recommended'"),
        ({"flow_check_every": 1, "flow_rollback_threshold": 0.5, "flow_max_rollbacks": 0}, "flow_max_rollbacks=0"),
        ({"flow_check_every": 1, "flow_max_rollbacks": 2}, "flow_max_rollbacks needs flow_rollback_threshold"),
        (
            {"flow_check_every": 1, "flow_rollback_threshold": 0.5, "flow_abstain_threshold": 0.5},
            "pass one of them",
        ),
        ({"flow_check_every": 1, "flow_rollback_threshold": 0.5, "num_beams": 2}, "num_beams=2"),
    ],
)
def test_bad_rollback_settings_name_the_argument(fc, extra, match):
    with pytest.raises(ValueError, match=match):
        fc.generate(input_ids=PROMPT, **KW, **extra)
    _no_hooks(fc)


def test_streamer_refusals(fc):
    with pytest.raises(ValueError, match="text already streamed cannot be taken back"):
        fc.generate(
            input_ids=PROMPT,
            streamer=FlowTextStreamer(CharTokenizer()),
            flow_check_every=1,
            flow_rollback_threshold=0.5,
            **KW,
        )
    two = torch.tensor([[5, 6, 7], [7, 8, 9]])
    with pytest.raises(ValueError, match="batch of 2"):
        fc.generate(input_ids=two, streamer=FlowTextStreamer(CharTokenizer()), **KW)
    _no_hooks(fc)


# ------------------------------------------------------------------------------- the example
def _example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "stream_risk.py"
    spec = importlib.util.spec_from_file_location("stream_risk", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_stream_risk_example_runs_on_a_tiny_model(fc):
    import json

    ex = _example()
    tok = CharTokenizer()
    chunks = list(ex.stream_answer(fc, tok, PROMPT, **KW))
    assert chunks[-1].final and "".join(c.text for c in chunks)
    assert all(ex.colour(c).startswith("\033[") for c in chunks)
    events = list(ex.sse_events(fc, tok, PROMPT, **KW))
    payloads = [json.loads(e.removeprefix("data: ")) for e in events]
    assert payloads[-1]["final"] and [p["text"] for p in payloads] == [c.text for c in chunks]
    # Stopping early cancels the generation and leaves no hook.
    it = ex.stream_answer(fc, tok, PROMPT, **KW)
    next(it)
    it.close()
    _no_hooks(fc)
