"""Gradient signatures and the gradient detector (design ``gradient-signatures.md``)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from hf_flowcheck.detectors.base import NotFittedError, ScoredExample
from hf_flowcheck.detectors.flow_validator import CheckpointError
from hf_flowcheck.detectors.gradient import (
    GradientConfig,
    GradientDetector,
    GradientSignatureError,
    abstention_labels,
    gradient_signature,
    gradient_signatures,
    is_abstention,
    signature_features,
    sketch_matrix,
    sketch_weight_gradient,
)
from hf_flowcheck.detectors.gradient.signature import _plans
from hf_flowcheck.fingerprint import FingerprintMismatchError
from hf_flowcheck.metrics import auroc

SEQ_FAMILIES = ["llama", "gpt2", "gpt_neox", "gemma2"]


def _inputs(seed: int = 0, seq: int = 12, answer: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 90, (1, seq), generator=g)
    ans = torch.zeros_like(ids)
    ans[0, seq - answer :] = 1
    return ids, ans


def _snapshot(model: torch.nn.Module) -> list[tuple[bool, torch.Tensor | None]]:
    return [(p.requires_grad, p.grad) for p in model.parameters()]


def _hook_counts(model: torch.nn.Module) -> list[int]:
    return [
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    ]


def _reference_loss(model: torch.nn.Module, ids: torch.Tensor, ans: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[0]
    pos = ans[0].nonzero().flatten()
    pos = pos[pos > 0]
    logp = torch.log_softmax(logits[pos - 1].float(), -1)
    return -logp.gather(-1, ids[0, pos].unsqueeze(-1)).mean()


# ------------------------------------------------------------------------------ the signature
@pytest.mark.parametrize("family", SEQ_FAMILIES)
def test_model_untouched(family: str) -> None:
    model = make_tiny_model(family)
    params = list(model.parameters())
    params[0].requires_grad_(False)  # a user's frozen embedding stays frozen
    params[-1].grad = torch.ones_like(params[-1])  # an existing .grad stays the very same tensor
    ids, ans = _inputs()
    with torch.no_grad():
        before_out = model(input_ids=ids).logits.clone()
    before, hooks = _snapshot(model), _hook_counts(model)
    sig = gradient_signature(model, ids, None, ans, GradientConfig(layers=2, sketch=4))
    after = _snapshot(model)
    assert [rg for rg, _ in after] == [rg for rg, _ in before]
    assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert _hook_counts(model) == hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before_out)
    assert sig.shape[0] == 2 and sig.dtype == torch.float32 and bool(torch.isfinite(sig).all())
    assert float(sig.norm()) > 0


def test_model_untouched_after_exception() -> None:
    model = make_tiny_model("llama")
    before, hooks = _snapshot(model), _hook_counts(model)

    def boom(module, inputs, output):
        raise RuntimeError("boom in the final norm")

    handle = model.model.norm.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            gradient_signature(model, *_inputs()[:1], None, _inputs()[1], GradientConfig(layers=2, sketch=4))
    finally:
        handle.remove()
    assert [(rg, g) for rg, g in _snapshot(model)] == before
    assert _hook_counts(model) == hooks


def test_block_slices_match_band_selection() -> None:
    """The gradient of a block does not depend on where the backward stops below it."""
    model = make_tiny_model("gpt_neox")
    ids, ans = _inputs(1)
    full = gradient_signature(model, ids, None, ans, GradientConfig(layers="all", sketch=4))
    last2 = gradient_signature(model, ids, None, ans, GradientConfig(layers=2, sketch=4))
    picked = gradient_signature(model, ids, None, ans, GradientConfig(layers=[0, -1], sketch=4))
    assert full.shape[0] == 4
    torch.testing.assert_close(full[-2:], last2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full[[0, 3]], picked, rtol=1e-5, atol=1e-6)


def _autograd_reference(model, ids, ans, block_index):
    """Norm-parameter and full linear-weight gradients of one block by plain autograd."""
    ref = copy.deepcopy(model)
    plan = _plans(ref)[block_index]
    for p in ref.parameters():
        p.requires_grad_(False)
    norm_ps = [p for _, p in plan.norm_params]
    lin_ws = [lin.module.weight for lin in plan.linears]
    for p in norm_ps + lin_ws:
        p.requires_grad_(True)
    grads = torch.autograd.grad(_reference_loss(ref, ids, ans), norm_ps + lin_ws, allow_unused=True)
    norm_g = [torch.zeros_like(p) if g is None else g for p, g in zip(norm_ps, grads[: len(norm_ps)])]
    lin_g = []
    for lin, g in zip(plan.linears, grads[len(norm_ps) :]):
        g = torch.zeros_like(lin.module.weight) if g is None else g
        lin_g.append(g if isinstance(lin.module, torch.nn.Linear) else g.T)  # Conv1D stores [in, out]
    return plan, norm_g, lin_g


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_exact_gradients_equal_autograd(family: str) -> None:
    model = make_tiny_model(family)
    ids, ans = _inputs(2)
    sig = gradient_signature(model, ids, None, ans, GradientConfig(layers=1, sketch=None))[0]
    _, norm_g, lin_g = _autograd_reference(model, ids, ans, 3)
    expected = torch.cat([g.reshape(-1) for g in norm_g] + [g.reshape(-1) for g in lin_g])
    torch.testing.assert_close(sig[: expected.numel()], expected, rtol=1e-4, atol=1e-6)


def test_sketch_is_projected_autograd_gradient() -> None:
    """With sketch=k each linear's entry is exactly P G Qᵀ of autograd's weight gradient G."""
    model = make_tiny_model("llama")
    ids, ans = _inputs(3)
    k, seed = 8, 5
    sig = gradient_signature(model, ids, None, ans, GradientConfig(layers=1, sketch=k, seed=seed))[0]
    plan, norm_g, lin_g = _autograd_reference(model, ids, ans, 3)
    parts = [g.reshape(-1) for g in norm_g]
    for lin, g in zip(plan.linears, lin_g):
        p = sketch_matrix(k, lin.out_features, seed=seed, block=3, name=lin.name, which="P")
        q = sketch_matrix(k, lin.in_features, seed=seed, block=3, name=lin.name, which="Q")
        parts.append((p @ g @ q.T).reshape(-1))
    expected = torch.cat(parts)
    assert sig.numel() == expected.numel()
    torch.testing.assert_close(sig, expected, rtol=1e-4, atol=1e-6)


def test_sketch_preserves_inner_products_in_expectation() -> None:
    g = torch.Generator().manual_seed(0)
    t, d_in, d_out, k = 10, 24, 20, 16
    xs = [torch.randn(t, d_in, generator=g) for _ in range(4)]
    ds = [torch.randn(t, d_out, generator=g) for _ in range(4)]
    exact = [sketch_weight_gradient(x, d) for x, d in zip(xs, ds)]
    torch.testing.assert_close(exact[0], ds[0].T @ xs[0])
    pairs = [(i, j) for i in range(4) for j in range(i, 4)]
    truth = np.array([float((exact[i] * exact[j]).sum()) for i, j in pairs])
    mean = np.zeros(len(pairs))
    draws = 300
    for s in range(draws):
        p = sketch_matrix(k, d_out, seed=s, which="P")
        q = sketch_matrix(k, d_in, seed=s, which="Q")
        sk = [sketch_weight_gradient(x, d, p, q) for x, d in zip(xs, ds)]
        if s == 0:
            one = np.array([float((sk[i] * sk[j]).sum()) for i, j in pairs])
            assert np.corrcoef(one, truth)[0, 1] > 0.6
        mean += np.array([float((sk[i] * sk[j]).sum()) for i, j in pairs]) / draws
    assert np.corrcoef(mean, truth)[0, 1] > 0.98
    assert np.abs(mean - truth).max() < 0.15 * np.abs(truth).max()


def test_signature_errors() -> None:
    model = make_tiny_model("llama")
    ids, _ = _inputs()
    with pytest.raises(ValueError, match="no predictable answer token"):
        gradient_signature(model, ids, None, torch.zeros_like(ids), GradientConfig(layers=1, sketch=4))
    with pytest.raises(ValueError, match="last 9 blocks but the model has 4"):
        gradient_signature(model, ids, None, _inputs()[1], GradientConfig(layers=9, sketch=4))
    with torch.inference_mode(), pytest.raises(GradientSignatureError, match="inference_mode"):
        gradient_signature(model, ids, None, _inputs()[1], GradientConfig(layers=1, sketch=4))
    with torch.no_grad():  # gradients are enabled inside
        gradient_signature(model, ids, None, _inputs()[1], GradientConfig(layers=1, sketch=4))


def test_half_precision_backward_failure_suggests_float32() -> None:
    model = make_tiny_model("llama").half()
    ids, ans = _inputs()

    def no_half_backward(module, inputs, output):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    handle = model.model.layers[3].mlp.down_proj.register_forward_hook(no_half_backward)
    before = _snapshot(model)
    try:
        with pytest.raises(GradientSignatureError, match="float32"):
            gradient_signature(model, ids, None, ans, GradientConfig(layers=1, sketch=4))
    finally:
        handle.remove()
    assert _snapshot(model) == before


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="layers"):
        GradientConfig(layers="some")
    with pytest.raises(ValueError, match="classes"):
        GradientConfig(classes=4)
    with pytest.raises(ValueError, match="reader"):
        GradientConfig(reader="gru")
    with pytest.raises(ValueError, match="num_heads"):
        GradientConfig(d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="regular expression"):
        GradientConfig(abstention_patterns=("(",))
    cfg = GradientConfig(layers=[1, -1], sketch=None, classes=3)
    assert GradientConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="Unknown GradientConfig"):
        GradientConfig.from_dict({"bogus": 1})


def test_abstention_matcher() -> None:
    assert is_abstention("I don't know.") and is_abstention("That cannot be determined from the text")
    assert not is_abstention("Paris") and not is_abstention("Knowledge is power")
    y = abstention_labels([0, 1, 1], ["Paris", "I do not know", "London"])
    assert y.tolist() == [0, 2, 1]


# ------------------------------------------------------------------------------- the detector
def _synthetic(n: int, layers: int = 3, dim: int = 12, classes: int = 2, seed: int = 0):
    """Signatures whose direction depends on the class (plus noise)."""
    base = torch.randn(classes, layers, dim, generator=torch.Generator().manual_seed(123))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    sig = base[y] + 0.8 * torch.randn(n, layers, dim, generator=g)
    sig = sig * (0.5 + torch.rand(n, 1, 1, generator=g))
    return sig, y


def test_features() -> None:
    sig, y = _synthetic(10)
    refs = torch.stack([sig[y == c].mean(0) for c in range(2)])
    f = signature_features(sig, refs)
    assert f.shape == (10, 3, 3)
    assert float(f[..., :2].abs().max()) <= 1 + 1e-5
    torch.testing.assert_close(f[..., 2], torch.log(sig.norm(dim=-1) + 1e-12))


@pytest.mark.parametrize("reader", ["logistic", "transformer"])
def test_detector_fit_score_and_round_trip(reader: str, tmp_path) -> None:
    sig, y = _synthetic(80, seed=1)
    vsig, vy = _synthetic(30, seed=2)
    tsig, ty = _synthetic(40, seed=3)
    cfg = GradientConfig(reader=reader, epochs=40, patience=10, d_model=16, num_heads=2, reader_layers=1)
    det = GradientDetector(cfg)
    assert not det.is_fitted
    with pytest.raises(NotFittedError, match="fit"):
        det.score(tsig)
    det.fit(sig, y, vsig, vy)
    scores = det.score(tsig)
    assert scores.shape == (40,) and np.all((scores >= 0) & (scores <= 1))
    assert auroc(ty.numpy(), scores) > 0.8
    assert det.training_metadata["history"]["selection"] == "validation AUROC"
    det.save_pretrained(tmp_path / "det")
    assert {p.name for p in (tmp_path / "det").iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded = GradientDetector.from_pretrained(tmp_path / "det")
    np.testing.assert_array_equal(loaded.score(tsig), scores)
    assert loaded.config == det.config


def test_loading_is_strict(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    sig, y = _synthetic(20)
    det = GradientDetector(GradientConfig(reader="logistic", epochs=3)).fit(sig, y, sig, y)
    det.save_pretrained(tmp_path / "d")
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    state["extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys"):
        GradientDetector.from_pretrained(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        GradientDetector.from_pretrained(tmp_path / "d")


def test_missing_class_is_named() -> None:
    sig, _ = _synthetic(10)
    with pytest.raises(ValueError, match=r"class 1 \('hallucinated'\)"):
        GradientDetector(GradientConfig(reader="logistic")).fit(sig, torch.zeros(10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class 2 \('did_not_answer'\)"):
        GradientDetector(GradientConfig(reader="logistic", classes=3)).fit(sig, torch.arange(10) % 2)
    with pytest.raises(ValueError, match="abstention_labels"):
        GradientDetector(GradientConfig(reader="logistic")).fit(sig, torch.arange(10) % 3)


def test_three_classes() -> None:
    sig, y = _synthetic(60, classes=3)
    det = GradientDetector(GradientConfig(reader="logistic", classes=3, epochs=30)).fit(sig, y, sig, y)
    proba = det.predict_proba(sig)
    assert proba.shape == (60, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
    assert det.abstention_score(sig).shape == (60,)


def test_detector_on_a_model_and_fingerprint(tmp_path) -> None:
    model = make_tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    examples = [
        ScoredExample([1, *torch.randint(2, 90, (6,), generator=g).tolist()], [5 + i % 7, 9], label=i % 2)
        for i in range(12)
    ]
    cfg = GradientConfig(layers=2, sketch=4, reader="logistic", epochs=5)
    det = GradientDetector(cfg)
    det.set_base_model(model)
    sig = det.featurize(model, examples)
    assert tuple(sig.shape[:2]) == (12, 2)
    torch.testing.assert_close(sig, gradient_signatures(model, examples, cfg))
    det.fit(sig, [e.label for e in examples], sig, [e.label for e in examples])
    det.save_pretrained(tmp_path / "g")
    loaded = GradientDetector.from_pretrained(tmp_path / "g", base_model=model)
    assert loaded.block_indices == [2, 3]
    np.testing.assert_array_equal(loaded.score_examples(model, examples), det.score(sig))
    with pytest.raises(FingerprintMismatchError):
        GradientDetector.from_pretrained(tmp_path / "g", base_model=make_tiny_model("llama", seed=1))
