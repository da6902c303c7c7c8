"""The contract every detector keeps: ``score`` is float64 ``[N]``, finite on real answers, oriented
"higher = more likely hallucinated", refused before fitting, and identical after a save/load round
trip for every detector that saves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, tiny_validator
from test_baselines import CharTokenizer
from test_baselines import _examples as baseline_examples

from hf_flowcheck.detectors.base import NotFittedError, ScoredExample
from hf_flowcheck.detectors.baselines import (
    AnswerLengthDetector,
    HiddenStateProbe,
    TokenConfidenceDetector,
)
from hf_flowcheck.detectors.flow_detector import FlowValidatorDetector
from hf_flowcheck.detectors.gradient import GradientConfig
from hf_flowcheck.detectors.registry import (
    DetectorOptions,
    build_detectors,
    register_detector,
    registered_detectors,
    unregister_detector,
)
from hf_flowcheck.metrics import auroc

#: Small settings per registered name, so that every detector of the table is built through it.
TINY = DetectorOptions(samples=2, max_new_tokens=2, protocol="paired",
                       gradient=GradientConfig(layers=2, sketch=8, reader="logistic", epochs=3))  # fmt: skip


def _detectors(model: torch.nn.Module) -> list:
    """Every registered detector (built by the registry), plus variants the table does not build."""
    options = dataclasses.replace(TINY, validator=tiny_validator(model))
    built = build_detectors(list(registered_detectors()), options)
    return [*built, HiddenStateProbe(layers=[1, 2], kind="mlp", epochs=5, hidden=4)]


def test_every_registered_name_builds_a_detector(model):
    options = dataclasses.replace(TINY, validator=tiny_validator(model))
    for name in registered_detectors():
        assert build_detectors([name], options), f"registered detector {name!r} built nothing with the test options"
    with pytest.raises(ValueError, match=r"unknown detector.*choose from flow"):
        build_detectors(["nope"], options)
    with pytest.raises(ValueError, match="already registered"):
        register_detector("flow", lambda o: [])


def test_a_registered_detector_is_offered_and_built(model):
    register_detector("length-again", lambda o: [AnswerLengthDetector()], help="test entry")
    try:
        assert "length-again" in registered_detectors()
        assert isinstance(build_detectors(["length-again"], TINY)[0], AnswerLengthDetector)
        with pytest.raises(TypeError, match="list of Detector"):
            register_detector("bad", lambda o: "x")
            build_detectors(["bad"], TINY)
    finally:
        unregister_detector("length-again")
        if "bad" in registered_detectors():
            unregister_detector("bad")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return make_tiny_model("llama")


N_DETECTORS = 10  # 1 flow + 1 gradient + 1 probe + 4 confidence + 1 sampling + 1 length, + the MLP probe


@pytest.mark.parametrize("index", range(N_DETECTORS))
def test_score_shape_dtype_fitting_and_round_trip(model, index, tmp_path) -> None:
    detectors = _detectors(model)
    assert len(detectors) == N_DETECTORS, "a detector was registered: raise N_DETECTORS so the contract covers it"
    det = detectors[index]
    ex = baseline_examples(12)
    feats = det.featurize(model, ex, tokenizer=CharTokenizer())
    if det.trainable:
        with pytest.raises(NotFittedError):
            det.score(feats)
        labels = np.array([e.label for e in ex])
        det.fit(feats, labels, feats, labels)
    scores = det.score(feats)
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float64 and scores.shape == (len(ex),)
    assert np.isfinite(scores).all(), f"{det.name} gave non-finite scores on real answers"
    if det.score_range == "[0, 1]":
        assert ((scores >= 0) & (scores <= 1)).all()
    saver = det.validator if isinstance(det, FlowValidatorDetector) else det
    if hasattr(saver, "save_pretrained"):
        if hasattr(saver, "set_base_model") and getattr(saver, "base_fingerprint", None) is None:
            saver.set_base_model(model)
        saver.save_pretrained(tmp_path / "saved")
        loaded = type(saver).from_pretrained(tmp_path / "saved", base_model=model)
        again = FlowValidatorDetector(loaded) if isinstance(det, FlowValidatorDetector) else loaded
        np.testing.assert_array_equal(again.score(feats), scores)


def test_probe_direction_and_unfitted_save() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, 6, generator=g)
    y = torch.arange(60) % 2
    x[:, 2, 0] += 3.0 * y  # hallucinated answers sit higher on one direction of layer 2
    probe = HiddenStateProbe(kind="logistic").fit(x[:40], y[:40], x[40:], y[40:])
    assert probe.layer == 2 and auroc(y[40:].numpy(), probe.score(x[40:])) > 0.9  # higher = hallucinated
    with pytest.raises(NotFittedError):
        HiddenStateProbe().save_pretrained("/nonexistent/never-written")


def test_token_confidence_direction(model) -> None:
    prompt = [1, 5, 6, 7]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    likely = ScoredExample(prompt, [int(logits.argmax())])
    unlikely = ScoredExample(prompt, [int(logits.argmin())])
    det = TokenConfidenceDetector("mean_logprob")
    s = det.score(det.featurize(model, [likely, unlikely]))
    assert s[0] < s[1]  # the model's own top token is the less suspicious answer


def test_flow_validator_rows_without_events_get_the_neutral_score(model) -> None:
    det = FlowValidatorDetector(tiny_validator(model))
    empty = ScoredExample([1, 5, 6], [0])  # a pad/special token only: no flow event
    s = det.score(det.featurize(model, [empty, *baseline_examples(2)]))
    assert s[0] == det.nan_score and det.last_without_events == 1 and np.isfinite(s).all()


def test_fused_detector_keeps_the_contract(tmp_path) -> None:
    from hf_flowcheck.workflows.compare import FusedDetector

    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    cols = {"probe": rng.random(40) + 0.8 * y, "confidence": rng.random(40)}
    with pytest.raises(NotFittedError):
        FusedDetector().score(cols)
    fused = FusedDetector().fit(cols, y)
    s = fused.score(cols)
    assert s.dtype == np.float64 and s.shape == (40,) and np.isfinite(s).all()
    assert auroc(y, s) > 0.8 and fused.weights()["probe"] > 0  # higher = more likely hallucinated
    fused.save_pretrained(tmp_path / "fused")
    np.testing.assert_array_equal(FusedDetector.from_pretrained(tmp_path / "fused").score(cols), s)
