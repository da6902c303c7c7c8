"""Baseline detectors: token confidence, sampling agreement, hidden-state probe, answer length."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from hf_flowcheck.data import LabeledExample
from hf_flowcheck.detectors.base import NotFittedError, ScoredExample, batch_examples, scored_examples
from hf_flowcheck.detectors.baselines import (
    AnswerLengthDetector,
    HiddenStateProbe,
    SamplingAgreementDetector,
    TokenConfidenceDetector,
    hidden_states_at_last_answer_token,
    token_confidence_features,
)


class CharTokenizer:
    """Printable ASCII -> ids 3..97 (BOS 1, EOS 98, PAD 0): enough for the tiny models (vocab 99)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 98

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [3 + ord(c) - 32 for c in text if 32 <= ord(c) <= 126]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return "".join(chr(i - 3 + 32) for i in ids if 3 <= i <= 97)

    def batch_decode(self, seqs, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(s) for s in seqs]


def _examples(n: int = 6, seed: int = 0) -> list[ScoredExample]:
    g = torch.Generator().manual_seed(seed)
    return [
        ScoredExample(
            [1, *torch.randint(3, 90, (3 + i % 4,), generator=g).tolist()],
            torch.randint(3, 90, (1 + i % 3,), generator=g).tolist(),
            label=i % 2,
            uid=f"u{i}",
        )
        for i in range(n)
    ]


def test_batch_examples_masks() -> None:
    ex = _examples(3)
    ids, att, ans = batch_examples(ex, 0)
    for i, e in enumerate(ex):
        assert ids[i, : e.length].tolist() == e.input_ids
        assert int(att[i].sum()) == e.length and int(ans[i].sum()) == len(e.answer_ids)


def test_scored_examples_split_prompt_and_answer() -> None:
    tok = CharTokenizer()
    le = LabeledExample("u1", "qa", "Question: x\nAnswer:", "Paris", 1, "generated")
    (se,) = scored_examples(tok, [le])
    assert tok.decode(se.answer_ids) == " Paris"
    assert se.prompt_ids[0] == 1 and se.label == 1 and se.uid == "u1"


def test_token_confidence_batch_invariance_and_direction() -> None:
    model = make_tiny_model("llama")
    ex = _examples(5)
    f4 = token_confidence_features(model, ex, batch_size=4)
    f1 = token_confidence_features(model, ex, batch_size=1)
    np.testing.assert_allclose(f4, f1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f1[:, 3], np.exp(f1[:, 0]), rtol=1e-9)
    assert np.all(f1[:, 1] >= f1[:, 0] - 1e-12)  # -min log p >= -mean log p
    # the model's own greedy tokens are more likely than its least likely ones
    prompt = [1, 5, 6, 7]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        logits = model(torch.tensor([prompt])).logits[0, -1]
    confident = ScoredExample(prompt, greedy[0, len(prompt) :].tolist())
    unlikely = ScoredExample(prompt, [int(logits.argmin())])
    for stat in ("mean_logprob", "min_logprob", "perplexity"):
        det = TokenConfidenceDetector(stat)
        s = det.score(det.featurize(model, [confident, unlikely]))
        assert s[1] > s[0], stat
    assert TokenConfidenceDetector("mean_entropy").is_fitted
    with pytest.raises(ValueError, match="statistic"):
        TokenConfidenceDetector("max_prob")


def test_sampling_agreement() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        SamplingAgreementDetector(1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingAgreementDetector(3, temperature=0.0)
    model = make_tiny_model("llama")
    tok = CharTokenizer()
    ex = _examples(3)
    det = SamplingAgreementDetector(3, max_new_tokens=4, seed=1, postprocess=None)
    with pytest.raises(ValueError, match="tokenizer"):
        det.featurize(model, ex)
    state = torch.random.get_rng_state()
    a = det.featurize(model, ex, tokenizer=tok)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = det.featurize(model, ex[::-1], tokenizer=tok)
    np.testing.assert_array_equal(a, b[::-1])  # seeded per prompt: order does not matter
    assert np.all((a >= 0) & (a <= 1))
    # greedy "samples" (top_k=1) all equal the answer: zero disagreement
    one = SamplingAgreementDetector(2, max_new_tokens=4, seed=1, postprocess=None, generate_kwargs={"top_k": 1})
    answer = one.samples(model, ex[0], tok)[0]
    s_same = one.featurize(model, [ScoredExample(ex[0].prompt_ids, [3], answer=answer)], tokenizer=tok)
    assert s_same[0] == pytest.approx(0.0)


def test_answer_length() -> None:
    det = AnswerLengthDetector()
    ex = _examples(4)
    assert det.score(det.featurize(None, ex)).tolist() == [float(len(e.answer_ids)) for e in ex]
    assert det.protocols == ("paired",)


def test_probe_refuses_before_fit_and_picks_planted_layer() -> None:
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> tuple[torch.Tensor, np.ndarray]:
        y = np.arange(n) % 2
        x = torch.randn(n, 5, 16, generator=g)
        x[:, 3, 0] += 2.0 * torch.as_tensor(y, dtype=torch.float32)  # the signal lives in layer 3
        return x, y

    (x, y), (vx, vy), (tx, ty) = data(80), data(40), data(40)
    probe = HiddenStateProbe()
    assert not probe.is_fitted
    with pytest.raises(NotFittedError, match="not been fitted"):
        probe.score(tx)
    probe.fit(x, y, vx, vy)
    assert probe.layer == 3
    assert max(probe.layer_auroc, key=probe.layer_auroc.get) == 3
    from hf_flowcheck.metrics import auroc

    s = probe.score(tx)
    assert s.shape == (40,) and auroc(ty, s) > 0.8
    mlp = HiddenStateProbe(layers=[1, 3], kind="mlp", epochs=100).fit(x, y, vx, vy)
    assert mlp.layer == 3 and "layer 3" in mlp.name
    with pytest.raises(ValueError, match="needs both 0 and 1"):
        HiddenStateProbe().fit(x, np.zeros(80))


def test_probe_features_on_a_model() -> None:
    model = make_tiny_model("gpt2")
    ex = _examples(5)
    hs = hidden_states_at_last_answer_token(model, ex, batch_size=2)
    assert hs.shape == (5, 5, 32)
    one = hidden_states_at_last_answer_token(model, ex[:1], batch_size=1)
    torch.testing.assert_close(hs[:1], one, rtol=1e-4, atol=1e-5)
    probe = HiddenStateProbe(layers=[-1])
    probe.fit_examples(model, ex, ex)
    assert probe.score_examples(model, ex).shape == (5,)


def test_pooled_flow_features_and_final_readout_confidence_by_hand():
    from hf_flowcheck.detectors.baselines import final_readout_confidence, pooled_flow_features
    from hf_flowcheck.extraction import FlowFeatures

    values = torch.zeros(2, 2, 3, 2)
    valid = torch.zeros(2, 2, 3, dtype=torch.bool)
    values[0, :, :2, 0] = torch.tensor([[1.0, 3.0], [math.e - 1, 0.5]])  # channel 0: the "lens_top1" probability
    values[0, :, :2, 1] = -1.0
    valid[0, :, :2] = True  # answer 0: two tokens; answer 1: no events
    pos = torch.tensor([[4, 5, -1], [-1, -1, -1]])
    feats = FlowFeatures(values, valid, pos, ("lens_top1", "f"))
    pooled = pooled_flow_features(feats)
    slog = lambda x: math.copysign(math.log1p(abs(x)), x)  # noqa: E731
    assert pooled.shape == (2, 4)
    assert pooled[0, 0].item() == pytest.approx((slog(1) + slog(3) + 1 + slog(0.5)) / 4)
    assert pooled[0, 2].item() == pytest.approx(slog(3))  # max of channel 0
    assert pooled[0, 1].item() == pytest.approx(slog(-1)) and pooled[0, 3].item() == pytest.approx(slog(-1))
    assert torch.equal(pooled[1], torch.zeros(4))  # no events: zeros, not -1e9
    conf = final_readout_confidence(feats)
    assert conf[0].item() == pytest.approx(-(math.log(math.e - 1) + math.log(0.5)) / 2)  # the last block's row
    assert math.isnan(conf[1].item())  # no events: nan, never a confident number
    assert final_readout_confidence(FlowFeatures(values, valid, pos, ("a", "b"))) is None
