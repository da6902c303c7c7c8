"""The spec's math on random inputs: windows, lemmas, invariances, JVPs."""

import math

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config

from hf_flowcheck import FlowExtractor
from hf_flowcheck import readout as readout_module
from hf_flowcheck.configuration import EPS
from hf_flowcheck.readout import candidate_rows, rank_top, readout_top, token_confidence_rows, vocabulary_blocks
from hf_flowcheck.signatures import (
    SUBSPACE_TOL,
    _top_subspace,
    block_updates,
    boundary_states,
    fit_basis,
    flow_features,
    grassmann_drift,
    path_integrated_updates,
    robust_center,
    sample_flow_features,
    select_readout_pairs,
    stable_angle,
    transport,
    window_layout,
)


def _orth(d, k, gen=None):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen))
    return q


def test_window_worked_example():
    w = window_layout(10, 4, 2)
    assert w.starts == (0, 2, 4, 6)
    assert w.ends == (3, 5, 7, 9)
    assert [j + 1 for j in w.assign] == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4]  # j(B) = J
    assert w.pool_blocks(3) == [6, 7, 8, 9, 10]


@pytest.mark.parametrize("n_blocks, length, stride", [(30, 8, 4), (4, 8, 4), (1, 1, 1), (7, 3, 3), (18, 8, 4)])
def test_windows_cover_every_block(n_blocks, length, stride):
    w = window_layout(n_blocks, length, stride)
    assert len(w.assign) == n_blocks + 1 and w.assign[-1] == w.num_windows - 1
    for b in range(n_blocks):
        j = w.assign[b]
        assert w.starts[j] <= b  # the earliest window containing b (when one does)
        assert w.assign[b + 1] - w.assign[b] in (0, 1)
    assert w.ends[-1] == n_blocks - 1


def test_rank_top_breaks_ties_by_smaller_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]])
    assert rank_top(logits, 3).tolist() == [[1, 2, 4], [4, 0, 1]]
    assert rank_top(logits, 2).tolist() == [[1, 2], [4, 0]]


@pytest.fixture
def narrow_blocks(monkeypatch):
    """Vocabulary blocks of at most 40 logits (and 7 columns), so a 50-id readout takes several."""
    monkeypatch.setattr(readout_module, "READOUT_BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(readout_module, "READOUT_BLOCK_MIN_WIDTH", 7)


def test_vocabulary_blocks_cover_the_vocabulary_within_the_budget(narrow_blocks):
    blocks = vocabulary_blocks(50, 4)
    assert [b.stop - b.start for b in blocks] == [10] * 5
    assert [b.stop - b.start for b in vocabulary_blocks(50, 100)] == [7] * 7 + [1]  # the width floor
    assert vocabulary_blocks(50, 0)[0] == slice(0, 40)


def test_blocked_readout_top_equals_the_whole_products_ranking(narrow_blocks):
    # Small integers: every logit is exact, so a block's product equals the whole product's bit for
    # bit (with general floats, BLAS may round a block's columns differently).
    gen = torch.Generator().manual_seed(0)
    states = torch.randint(-3, 4, (6, 8), generator=gen).float()
    readout = torch.randint(-3, 4, (50, 8), generator=gen).float()
    for n in (1, 5, 12, 50):
        assert torch.equal(readout_top(states, readout, n), rank_top(states @ readout.T, n))
    # Ties across block boundaries go to the smaller id, as in rank_top: rows of W repeated in
    # several blocks give equal logits.
    tied = readout[:5].repeat(10, 1)  # ids i, i + 5, i + 10, ... share a row of W
    got = readout_top(states, tied, 12)
    assert torch.equal(got, rank_top(states @ tied.T, 12))
    assert torch.equal(got[:, :10] % 5, got[:, :1].expand(-1, 10) % 5)  # the ten copies of the best row
    assert torch.equal(got[:, :10], got[:, :10].sort(-1).values)  # ... in ascending id order


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_blocked_token_confidence_equals_log_softmax(narrow_blocks, softcap):
    gen = torch.Generator().manual_seed(1)
    states, readout = 3 * torch.randn(9, 8, generator=gen), torch.randn(50, 8, generator=gen)
    tokens = torch.tensor([0, 9, 10, 49, 25, 3, 40, 41, 17])
    logits = states @ readout.T
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, -1)
    want = torch.stack([logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)], -1)
    got = token_confidence_rows(states, lambda x: x, readout, tokens, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert token_confidence_rows(states[:0], lambda x: x, readout, tokens[:0]).shape == (0, 2)


def test_cap_bounds_readouts_and_is_seeded():
    w = window_layout(30, 8, 4)
    pairs = select_readout_pairs(50, w, 32, 1024, sample_key=7, seed0=0)
    assert all(t.numel() <= math.ceil(1024 / 32) for t, _ in pairs)
    again = select_readout_pairs(50, w, 32, 1024, sample_key=7, seed0=0)
    other = select_readout_pairs(50, w, 32, 1024, sample_key=8, seed0=0)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(pairs, again))
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(pairs, other))
    small = select_readout_pairs(2, w, 32, 1024, sample_key=7, seed0=0)  # under the cap: every pair
    assert [t.numel() for t, _ in small] == [2 * len(w.pool_blocks(j)) for j in range(w.num_windows)]


def test_candidate_rows_are_the_union_of_each_tokens_top():
    gen = torch.Generator().manual_seed(0)
    w, last = torch.randn(50, 8, generator=gen), torch.randn(3, 8, generator=gen)
    rows = candidate_rows(last, w, 5)
    top = (last @ w.T).topk(5, dim=-1).indices
    assert rows.tolist() == sorted(set(top.flatten().tolist()))
    assert 5 <= rows.numel() <= 15
    assert torch.equal(candidate_rows(last, w, 50), torch.arange(50))
    assert torch.equal(candidate_rows(last[:0], w, 5), torch.arange(50))


def test_fit_basis_full_rank_deficient_and_empty():
    gen = torch.Generator().manual_seed(0)
    d, k = 12, 4
    u = fit_basis(torch.randn(40, d, generator=gen), d, k)
    torch.testing.assert_close(u.T @ u, torch.eye(k), atol=1e-5, rtol=0)
    span = _orth(d, 2, gen)  # directions of rank 2 only
    dirs = torch.randn(30, 2, generator=gen) @ span.T
    u = fit_basis(dirs, d, k)
    torch.testing.assert_close(u.T @ u, torch.eye(k), atol=1e-5, rtol=0)
    torch.testing.assert_close((u @ u.T) @ span, span, atol=1e-5, rtol=0)  # contains the found span
    torch.testing.assert_close(fit_basis(torch.zeros(0, d), d, k), torch.eye(d)[:, :k])
    torch.testing.assert_close(fit_basis(torch.zeros(5, d), d, k), torch.eye(d)[:, :k])


def test_subspace_solver_finds_the_eigensolve_subspace_or_falls_back():
    gen = torch.Generator().manual_seed(3)
    d, k = 48, 6
    # A decaying spectrum, as competitor directions have.
    dirs = torch.randn(200, d, generator=gen) * torch.linspace(3.0, 0.1, d)
    u, v = fit_basis(dirs, d, k), fit_basis(dirs, d, k, solver="subspace")
    torch.testing.assert_close(v.T @ v, torch.eye(k), atol=1e-5, rtol=0)
    assert _top_subspace(dirs.T @ dirs, k, dirs.shape[0]) is not None  # the iteration was kept, not the fallback
    assert float(torch.linalg.matrix_norm(v @ v.T - u @ u.T, 2)) <= SUBSPACE_TOL  # sin of the largest angle
    # Rank 2 < k: the Ritz values fail the rank test, so the eigensolve (and its completion) is used.
    span = _orth(d, 2, gen)
    low = torch.randn(60, 2, generator=gen) @ span.T
    assert torch.equal(fit_basis(low, d, k, solver="subspace"), fit_basis(low, d, k))
    # Fewer than 4k directions: the thin SVD either way.
    few = dirs[: 4 * k - 1]
    assert torch.equal(fit_basis(few, d, k, solver="subspace"), fit_basis(few, d, k))


def test_procrustes_optimality_lemma_a3():
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        u, v = _orth(20, 5, gen), _orth(20, 5, gen)
        r = transport(u, v)
        torch.testing.assert_close(r.T @ r, torch.eye(5), atol=1e-5, rtol=0)
        sig = torch.linalg.svdvals(v.T @ u)
        best = (u - v @ r).norm() ** 2
        assert abs(float(best) - (10 - 2 * float(sig.sum()))) < 1e-4
        for _ in range(20):
            q = _orth(5, 5, gen)
            assert float((u - v @ q).norm() ** 2) >= float(best) - 1e-5


def test_transport_reset_option():
    gen = torch.Generator().manual_seed(2)
    u, v = _orth(20, 5, gen), _orth(20, 5, gen)
    assert torch.equal(transport(u, v, min_overlap=0.999), torch.eye(5))


def test_grassmann_drift_is_sin_theta_max_and_bounds_chi():
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        u, v = _orth(16, 4, gen), _orth(16, 4, gen)
        sig = torch.linalg.svdvals(u.T @ v).clamp(max=1.0)
        d_g = float(grassmann_drift(u, v))
        assert abs(d_g - math.sqrt(1 - float(sig.min()) ** 2)) < 1e-4
        assert 0.0 <= d_g <= 1.0 + 1e-6
        x = torch.randn(50, 16, generator=gen)
        chi = ((x @ v) @ v.T - (x @ u) @ u.T).norm(dim=-1) / (x.norm(dim=-1) + EPS)
        assert float(chi.min()) >= 0 and float(chi.max()) <= d_g + 1e-5


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_shell_bound_lemma_31(kind):
    d = 64
    gen = torch.Generator().manual_seed(4)
    if kind == "rms":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        norm = LlamaRMSNorm(d, eps=1e-6)
        bias = torch.zeros(d)
    else:
        norm = torch.nn.LayerNorm(d, eps=1e-5)
        with torch.no_grad():
            norm.bias.copy_(torch.randn(d, generator=gen))
        bias = norm.bias.detach()
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(d, generator=gen))
    u = torch.randn(200, d, generator=gen) * torch.logspace(-1, 1, 200)[:, None]
    r = u[:, None, :]
    _h, h_t = boundary_states(r, [norm], bias[None], "normalized")
    eps = norm.variance_epsilon if kind == "rms" else norm.eps
    mom = (u**2).mean(-1) if kind == "rms" else u.var(-1, unbiased=False)
    c = torch.sqrt(mom / (mom + eps))
    g = norm.weight.detach()
    lo = float(g.min()) * c * math.sqrt(d)
    hi = float(g.max()) * c * math.sqrt(d)
    n = h_t[:, 0].norm(dim=-1)
    assert bool((n >= lo - 1e-4).all()) and bool((n <= hi + 1e-4).all())


def test_centers():
    x = torch.tensor([[0.0, 10.0], [1.0, 0.0], [2.0, 1.0], [100.0, 2.0]])
    torch.testing.assert_close(robust_center(x, "coordinate_median"), torch.tensor([1.5, 1.5]))  # numpy's convention
    torch.testing.assert_close(robust_center(x, "mean"), x.mean(0))
    sym = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(
        robust_center(sym + 3.0, "geometric_median"), torch.tensor([3.0, 3.0]), atol=1e-4, rtol=0
    )
    assert torch.equal(robust_center(torch.zeros(0, 3), "geometric_median"), torch.zeros(3))
    q = _orth(2, 2, torch.Generator().manual_seed(5))  # rotation equivariance
    torch.testing.assert_close(
        robust_center(x @ q, "geometric_median"), robust_center(x, "geometric_median") @ q, atol=1e-3, rtol=1e-4
    )


def test_stable_angle():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [-1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    torch.testing.assert_close(stable_angle(a, b), torch.tensor([math.pi / 2, math.pi, 0.0, 0.0]))
    t = 1e-4  # tiny angles are resolved, unlike a clamped arccos in float32
    small = stable_angle(torch.tensor([[1.0, 0.0]]), torch.tensor([[math.cos(t), math.sin(t)]]))
    assert abs(float(small) - t) < 1e-7


def test_jvp_against_torch_func_on_real_modules(family):
    model = make_tiny_model(family)
    ext = FlowExtractor(model, tiny_flow_config())
    real = ext.arch.boundary_norms[2]
    gen = torch.Generator().manual_seed(6)
    r_in, o, m = (torch.randn(5, 32, generator=gen) for _ in range(3))
    r_out = r_in + o + m
    qa, qm, qe = path_integrated_updates(ext.norms[2], r_in, r_out, o, m)

    def jvp(x, v):
        return torch.func.jvp(real, (x,), (v,))[1]

    want_a = sum(w * jvp(r_in + a * (o + m), o) for a, w in ((0, 1 / 6), (0.5, 4 / 6), (1, 1 / 6)))
    want_m = sum(w * jvp(r_in + a * (o + m), m) for a, w in ((0, 1 / 6), (0.5, 4 / 6), (1, 1 / 6)))
    for got, want in ((qa, want_a), (qm, want_m), (qe, jvp(r_out, o + m))):
        rel = (got - want).norm() / want.norm()
        assert float(rel) < 1e-5


def test_block_updates_projected_block_by_block_equal_the_projected_updates():
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config())
    gen = torch.Generator().manual_seed(7)
    n_blocks, dim = len(ext.norms) - 1, 32
    r = torch.randn(4, n_blocks + 1, dim, generator=gen)
    o, m = torch.randn(4, n_blocks, dim, generator=gen), torch.randn(4, n_blocks, dim, generator=gen)
    basis = torch.randn(n_blocks, dim, 3, generator=gen)
    full = block_updates(r, o, m, ext.norms)  # [R, B, 3, d]
    projected = block_updates(r, o, m, ext.norms, project=basis)
    assert projected.shape == (4, n_blocks, 3, 3)
    torch.testing.assert_close(projected, torch.einsum("tbsd,bdk->tbsk", full, basis), atol=1e-5, rtol=1e-5)


def test_rmsnorm_jvp_matches_closed_form():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, v = torch.randn(3, 16), torch.randn(3, 16)
    _, _, qe = path_integrated_updates(norm, x, x, v, torch.zeros_like(v))
    rms = torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6)
    closed = norm.weight * (v / rms - x * (x * v).mean(-1, keepdim=True) / rms**3)
    torch.testing.assert_close(qe, closed.detach(), atol=1e-5, rtol=1e-5)


def _sample_inputs(family="llama", n_tok=6, seed=0):
    model = make_tiny_model(family, seed=seed)
    ext = FlowExtractor(model, tiny_flow_config(direction_cap=32))
    ids = torch.randint(2, 97, (1, n_tok + 3), generator=torch.Generator().manual_seed(seed))
    resp = torch.zeros_like(ids)
    resp[:, 3:] = 1
    rows, cols = resp.bool().nonzero(as_tuple=True)
    from hf_flowcheck.capture import FlowRecorder

    with FlowRecorder(ext.arch, lambda c, *a: (rows, cols, cols) if c == 0 else None) as rec, torch.no_grad():
        model(ids)
    st = rec.result()
    ext._prepare_math(torch.device("cpu"))
    return ext, st


@pytest.mark.parametrize("center", ["geometric_median", "mean"])
@pytest.mark.parametrize("boundary", ["normalized", "residual"])
def test_gauge_invariance_lemma_32(center, boundary):
    ext, st = _sample_inputs("gemma2")
    cfg = tiny_flow_config(center=center, boundary=boundary, direction_cap=32)
    feats, geo = sample_flow_features(st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, cfg, 11)
    gen = torch.Generator().manual_seed(7)
    rotated = [u @ _orth(u.shape[1], u.shape[1], gen) for u in geo.bases]
    feats_rot, _ = sample_flow_features(st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, cfg, 11, bases=rotated)
    torch.testing.assert_close(feats_rot, feats, atol=2e-4, rtol=2e-4)


def test_coordinate_median_is_not_gauge_invariant_but_others_are_unchanged():
    ext, st = _sample_inputs("llama", n_tok=8)
    cfg = tiny_flow_config(center="coordinate_median", direction_cap=32)
    feats, geo = sample_flow_features(st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, cfg, 11)
    gen = torch.Generator().manual_seed(8)
    rotated = [u @ _orth(u.shape[1], u.shape[1], gen) for u in geo.bases]
    feats_rot, _ = sample_flow_features(st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, cfg, 11, bases=rotated)
    idx = [i for i, n in enumerate(cfg.feature_names) if n != "step_centered"]
    torch.testing.assert_close(feats_rot[..., idx], feats[..., idx], atol=2e-4, rtol=2e-4)


def test_feature_sets_and_shapes():
    ext, st = _sample_inputs("llama")
    full, geo = sample_flow_features(st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, tiny_flow_config(), 1)
    paper, _ = sample_flow_features(
        st.r, st.o, st.m, ext._norms, ext._betas, ext._readout, tiny_flow_config(features="paper"), 1
    )
    assert full.shape == (4, 6, 10) and paper.shape == (4, 6, 8)
    torch.testing.assert_close(paper, full[..., :8])
    assert torch.isfinite(full).all()
    # Token-level summaries are constant over depth.
    for name in ("drift", "attn_turn_ratio", "mlp_turn_ratio"):
        i = tiny_flow_config().feature_names.index(name)
        assert torch.allclose(full[:, :, i], full[:1, :, i].expand(4, -1))
    # step is the norm of the transported increment: non-negative; turn in [0, pi].
    assert (full[..., 0] >= 0).all() and (full[..., 2] >= 0).all() and (full[..., 2] <= math.pi + 1e-5).all()
    # drift is a sum of J-1 terms each in [0, 1].
    assert (full[..., 7] <= geo.layout.num_windows - 1 + 1e-5).all()


def test_flow_features_with_identity_bases_by_hand():
    """step/attn_mag on a hand-checkable case: identity bases, one window, no transport."""
    from hf_flowcheck.signatures import WindowLayout

    d, k = 4, 4
    layout = WindowLayout((0,), (1,), (0, 0, 0))
    r = torch.tensor([[[1.0, 0, 0, 0], [1.0, 1.0, 0, 0], [1.0, 1.0, 1.0, 0]]])  # [R=1, B+1=3, d]
    o = torch.tensor([[[0.0, 1.0, 0, 0], [0.0, 0, 0.5, 0]]])
    m = r[:, 1:] - r[:, :-1] - o
    cfg = tiny_flow_config(subspace_dim=k, boundary="residual")
    ident = [torch.eye(d)]
    norms = [torch.nn.Identity()] * 3
    feats, _ = flow_features(r, r, r, o, m, norms, ident, layout, cfg)
    torch.testing.assert_close(feats[:, 0, 0], torch.tensor([1.0, 1.0]))  # step = |r[b+1]-r[b]|
    torch.testing.assert_close(feats[:, 0, 3], torch.tensor([1.0, 0.5]))  # attn_mag
    torch.testing.assert_close(feats[:, 0, 4], torch.tensor([0.0, 0.5]))  # mlp_mag
    torch.testing.assert_close(feats[:, 0, 5], torch.tensor([1.0, 1.0]))  # identity norm: update = inj
    torch.testing.assert_close(feats[:, 0, 6], torch.tensor([0.0, 0.0]))  # linear norm: no residual
    torch.testing.assert_close(feats[:, 0, 2], torch.tensor([math.pi / 4, math.atan(1 / math.sqrt(2))]))


def test_closed_form_norm_jvp_matches_autograd_or_is_refused(family):
    from hf_flowcheck.signatures import closed_form_norm_jvp

    ext = FlowExtractor(make_tiny_model(family), tiny_flow_config())
    g = torch.Generator().manual_seed(1)
    for norm in ext.norms:
        dim = ext.readout.shape[1]
        x, v = torch.randn(6, dim, generator=g) * 2, torch.randn(6, dim, generator=g)
        ref = torch.func.jvp(norm, (x,), (v,))[1]
        fast = norm.flowcheck_jvp  # RMSNorm / LayerNorm in every family here
        torch.testing.assert_close(fast(x, v), ref, rtol=1e-4, atol=1e-5)

    class Odd(torch.nn.Module):  # a norm of another form: no closed form, the generic JVP is used
        def __init__(self):
            super().__init__()
            self.weight, self.eps = torch.nn.Parameter(torch.ones(8)), 1e-6

        def forward(self, x):
            return self.weight * torch.tanh(x)

    assert closed_form_norm_jvp(Odd(), 8) is None
