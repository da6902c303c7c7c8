"""FlowValidator (spec §6): shapes, pooling, culprits, and invariance to batch and padding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_flowcheck.configuration import FlowConfig
from hf_flowcheck.detectors import FlowValidator, FlowValidatorOutput, ValidatorConfig
from hf_flowcheck.extraction import FlowFeatures

F = 10
SMALL = dict(hidden=24, embed=12, gru_hidden=16)


def make_validator(seed: int = 0, **kw) -> FlowValidator:
    torch.manual_seed(seed)
    return FlowValidator(ValidatorConfig(num_features=F, **{**SMALL, **kw})).eval()


def random_batch(n: int = 5, b: int = 4, t: int = 6, seed: int = 0, p: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, b, t, F, generator=g)
    valid = torch.rand(n, b, t, generator=g) < p
    valid[:, :, 0] = True  # every row has events
    return values, valid


def reference_logits(v: FlowValidator, values: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """Per-row event logits computed one row at a time on the valid events in depth-major order."""
    out = []
    for i in range(values.shape[0]):
        b_idx, t_idx = valid[i].nonzero(as_tuple=True)  # row-major over [B, T] = depth-major
        x = values[i, b_idx, t_idx][None]  # [1, L, F]
        x = torch.sign(x) * torch.log1p(x.abs()) if v.config.input_transform == "log_standardize" else x
        if v.config.input_transform != "none":
            x = (x - v.feature_shift) / v.feature_scale
        h = v.embed_norm(v.mlp(v.input_norm(x) if v.config.event_layernorm else x))
        states, _ = v.gru(h)
        out.append(v.head(states)[0, :, 0])
    return out


def test_output_shapes_ranges_and_culprit():
    v = make_validator()
    values, valid = random_batch()
    out = v(values, valid)
    assert isinstance(out, FlowValidatorOutput)
    n, b, t = valid.shape
    assert out.logits.shape == (n,) and out.scores.shape == (n,) and out.event_logits.shape == (n, b, t)
    assert bool(((out.scores >= 0) & (out.scores <= 1)).all())
    assert torch.allclose(out.scores, torch.sigmoid(out.logits))
    assert bool(torch.isinf(out.event_logits[~valid]).all()) and bool((out.event_logits[~valid] < 0).all())
    assert bool(torch.isfinite(out.event_logits[valid]).all())
    assert out.has_events.all()
    for i in range(n):
        bi, ti = int(out.culprit_block[i]), int(out.culprit_column[i])
        assert valid[i, bi, ti]
        assert out.event_logits[i, bi, ti] == out.event_logits[i].max()
        assert torch.isclose(out.logits[i], out.event_logits[i].max())


def test_matches_depth_major_reference():
    v = make_validator(seed=1)
    values, valid = random_batch(n=4, seed=3)
    out = v(values, valid)
    with torch.no_grad():
        ref = reference_logits(v, values, valid)
    for i, r in enumerate(ref):
        torch.testing.assert_close(out.event_logits[i][valid[i]], r, atol=1e-5, rtol=1e-5)


def test_input_transform_is_fitted_per_feature_and_saved(tmp_path):
    v = make_validator()
    values, valid = random_batch(n=5, seed=4)
    values = values * torch.tensor([100.0] + [1.0] * (values.shape[-1] - 1))
    v.fit_input_transform(values, valid)
    ev = v._transform_inputs(values[valid])
    torch.testing.assert_close(ev.mean(0), torch.zeros(values.shape[-1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ev.std(0), torch.ones(values.shape[-1]), atol=1e-4, rtol=0)
    v.save_pretrained(tmp_path)
    again = FlowValidator.from_pretrained(str(tmp_path))
    torch.testing.assert_close(again.feature_scale, v.feature_scale)
    spec = make_validator(input_transform="none")
    spec.fit_input_transform(values, valid)  # the spec's B.9: no per-feature scaling
    assert torch.equal(spec.feature_scale, torch.ones_like(spec.feature_scale))


def test_logsumexp_pooling():
    v = make_validator(pooling="logsumexp")
    values, valid = random_batch()
    out = v(values, valid)
    for i in range(values.shape[0]):
        torch.testing.assert_close(out.logits[i], torch.logsumexp(out.event_logits[i][valid[i]], 0))


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(pooling="logsumexp"),
        dict(head="attention"),
        dict(head="attention", state_dim=3, state_blocks=(1, 2)),
        dict(head="depth"),
        dict(head="depth", state_dim=3, state_blocks=(1, 2)),
    ],
)
def test_token_logits_pool_back_to_the_answer_logit(kw):
    v = make_validator(seed=2, **kw)
    values, valid = random_batch(n=4, seed=6, p=0.5)
    valid[1, :, 2] = False  # a token without events
    states = torch.randn(4, values.shape[1] + 1, 3) if "state_dim" in kw else None
    out = v(values, valid, states)
    tok, w = out.token_logits, out.token_weights
    has = valid.any(1)
    assert tok.shape == w.shape == has.shape
    assert bool(torch.isnan(tok[~has]).all()) and bool(torch.isfinite(tok[has]).all())
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    assert bool((w[~has] == 0).all())
    for i in range(4):
        t_i, w_i = tok[i][has[i]], w[i][has[i]]
        if kw.get("head") == "attention":
            torch.testing.assert_close(out.logits[i], (w_i * t_i).sum(), atol=1e-5, rtol=1e-5)
        elif kw.get("head") == "depth":
            # a token's logit is the answer's logit had the answer only this token's events
            for j in has[i].nonzero()[:, 0].tolist():
                alone = v(
                    values[i : i + 1, :, j : j + 1],
                    valid[i : i + 1, :, j : j + 1],
                    states[i : i + 1] if states is not None else None,
                )
                torch.testing.assert_close(tok[i, j], alone.logits[0], atol=1e-5, rtol=1e-5)
            assert int(w[i].argmax()) == int(out.culprit_column[i])
            # the culprit token has the largest event logit of the culprit block
            b0 = int(out.culprit_block[i])
            assert out.event_logits[i, b0, out.culprit_column[i]] == out.event_logits[i, b0].max()
        elif kw.get("pooling") == "logsumexp":
            torch.testing.assert_close(out.logits[i], torch.logsumexp(t_i, 0), atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(out.logits[i], t_i.max())
            assert int(w[i].argmax()) == int(out.culprit_column[i])
        if kw.get("head") != "depth":
            # the culprit is the riskiest token, at the block of its largest event logit
            col = int(out.culprit_column[i])
            assert tok[i, col] == tok[i][has[i]].max()
            assert int(out.culprit_block[i]) == int(out.event_logits[i, :, col].argmax())
    # A token's logit is set by its own column: changing another token's features leaves it alone
    # (the attention head scores events independently).
    if kw.get("head") == "attention":
        moved = values.clone()
        moved[:, :, 0] += 3.0
        again = v(moved, valid, states)
        torch.testing.assert_close(again.token_logits[:, 1:], tok[:, 1:], atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("head", ["gru", "attention", "depth"])
def test_row_does_not_depend_on_other_rows(head):
    v = make_validator(head=head)
    values, valid = random_batch(n=6, seed=5, p=0.4)
    valid[2] = False
    valid[2, 0, :2] = True  # a short row next to long ones
    batch = v(values, valid)
    for i in range(values.shape[0]):
        alone = v(values[i : i + 1], valid[i : i + 1])
        torch.testing.assert_close(alone.logits[0], batch.logits[i], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(alone.event_logits[0], batch.event_logits[i], atol=1e-6, rtol=1e-6)
        assert int(alone.culprit_block[0]) == int(batch.culprit_block[i])


@pytest.mark.parametrize("head", ["gru", "attention", "depth"])
def test_padding_columns_and_garbage_in_invalid_cells_change_nothing(head):
    v = make_validator(head=head)
    values, valid = random_batch(n=3, t=5, seed=7)
    base = v(values, valid)
    # Insert two all-invalid columns in the middle and one at the end, filled with garbage (even NaN).
    n, b, t, _ = values.shape
    pad_vals = torch.full((n, b, t + 3, F), float("nan"))
    pad_valid = torch.zeros(n, b, t + 3, dtype=torch.bool)
    cols = [0, 1, 4, 5, 6]  # where the original columns go
    pad_vals[:, :, cols] = values
    pad_valid[:, :, cols] = valid
    pad_vals[:, :, cols] = torch.where(valid[..., None], values, torch.full_like(values, 1e6))
    out = v(pad_vals, pad_valid)
    torch.testing.assert_close(out.logits, base.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.event_logits[:, :, cols], base.event_logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(out.culprit_block, base.culprit_block)
    assert torch.equal(torch.tensor(cols)[base.culprit_column], out.culprit_column)


@pytest.mark.parametrize("head", ["gru", "attention", "depth"])
def test_rows_without_events_never_crash(head):
    v = make_validator(head=head)
    values, valid = random_batch(n=3)
    valid[1] = False
    out = v(values, valid)
    assert out.has_events.tolist() == [True, False, True]
    assert torch.isnan(out.scores[1]) and torch.isnan(out.logits[1])
    assert int(out.culprit_block[1]) == -1 and int(out.culprit_column[1]) == -1
    assert bool(torch.isfinite(out.scores[[0, 2]]).all())
    # all rows empty, no columns, no rows
    empty = v(values, torch.zeros_like(valid))
    assert bool(torch.isnan(empty.scores).all()) and not empty.has_events.any()
    no_cols = v(torch.zeros(2, 4, 0, F), torch.zeros(2, 4, 0, dtype=torch.bool))
    assert no_cols.event_logits.shape == (2, 4, 0) and bool(torch.isnan(no_cols.scores).all())
    none = v(torch.zeros(0, 4, 3, F), torch.zeros(0, 4, 3, dtype=torch.bool))
    assert none.scores.shape == (0,)


@pytest.mark.parametrize("head", ["gru", "attention", "depth"])
def test_gradients_finite_with_an_empty_row(head):
    torch.manual_seed(0)
    v = FlowValidator(ValidatorConfig(num_features=F, head=head, **SMALL)).train()
    values, valid = random_batch(n=3)
    valid[1] = False
    out = v(values, valid)
    loss = out.logits[out.has_events].sum()
    loss.backward()
    grads = [p.grad for p in v.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)  # a gradient flows from the rows with events


def test_input_errors_are_clear():
    v = make_validator()
    values, valid = random_batch()
    with pytest.raises(ValueError, match="num_features=10"):
        v(values[..., :8], valid)
    with pytest.raises(ValueError, match=r"valid must be a \[N, B, T\]"):
        v(values, valid[:, :, :2])
    bad = values.clone()
    bad[2, 0, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf at valid events of sample\(s\) \[2\]"):
        v(bad, valid)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_features=0), "num_features=0"),
        (dict(num_features=10, pooling="mean"), "pooling='mean'.*'max', 'logsumexp'"),
        (dict(num_features=10, dropout=1.5), r"dropout=1.5.*\[0, 1\)"),
        (dict(num_features=3, feature_names=("a", "b")), "feature_names has 2 names but num_features=3"),
        (dict(num_features=10, hidden=True), "hidden=True"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ValidatorConfig(**kwargs)


def test_config_round_trip_and_strict_from_dict():
    cfg = ValidatorConfig.from_feature_names(["a", "b"], pooling="logsumexp")
    d = cfg.to_dict()
    assert d["format_version"] == ValidatorConfig.FORMAT_VERSION == 4 and "hf_flowcheck_version" in d
    assert ValidatorConfig.from_dict(d) == cfg
    old = {k: v for k, v in d.items() if k not in ("input_transform", "event_layernorm")}
    assert ValidatorConfig.from_dict({**old, "format_version": 1}).input_transform == "none"  # the spec's B.9
    with pytest.raises(ValueError, match="Unknown ValidatorConfig field"):
        ValidatorConfig.from_dict({**d, "hiden": 3})
    with pytest.raises(ValueError, match="newer than this hf_flowcheck"):
        ValidatorConfig.from_dict({**d, "format_version": 99})
    with pytest.raises(ValueError, match="needs a validator_config"):
        FlowValidator()


def test_score_features_positions_names_and_batching():
    names = tuple(f"f{i}" for i in range(F))
    torch.manual_seed(0)
    v = FlowValidator(ValidatorConfig.from_feature_names(names, **SMALL)).train()
    values, valid = random_batch(n=5, t=4)
    valid[3] = False
    positions = torch.tensor([[10, 11, 12, 13]] * 5)
    positions[4, 3] = -1
    valid[4, :, 3] = False
    feats = FlowFeatures(values, valid, positions, names)
    out = v.score_features(feats)
    assert v.training  # mode restored
    assert out.culprit_position is not None
    for i in range(5):
        if out.has_events[i]:
            assert int(out.culprit_position[i]) == int(positions[i, out.culprit_column[i]])
        else:
            assert int(out.culprit_position[i]) == -1
    one = v.score_features(feats, batch_size=1)
    torch.testing.assert_close(one.scores, out.scores, equal_nan=True, atol=1e-6, rtol=1e-6)
    wrong = FlowFeatures(values, valid, positions, tuple(reversed(names)))
    with pytest.raises(ValueError, match="trained on"):
        v.score_features(wrong)
    with pytest.raises(ValueError, match="takes FlowFeatures"):
        v.score_features(values)


@pytest.mark.parametrize("head", ["gru", "attention", "depth"])
def test_ensemble_is_the_mean_of_its_members(head):
    v = make_validator(seed=3, head=head, members=3)
    values, valid = random_batch(n=4, seed=8, p=0.5)
    valid[2] = False  # a row without events
    out = v(values, valid)
    parts = [m(values, valid) for m in v.members]
    torch.testing.assert_close(out.logits, torch.stack([o.logits for o in parts]).mean(0), equal_nan=True)
    assert not torch.allclose(parts[0].logits[:2], parts[1].logits[:2])  # members start apart
    events = torch.stack([o.event_logits for o in parts]).mean(0)
    torch.testing.assert_close(out.event_logits, events)
    has = out.has_events
    assert has.tolist() == [True, True, False, True]
    # the culprit is the riskiest token of the mean token logits, at its largest mean event logit
    tokens = torch.stack([o.token_logits for o in parts]).mean(0)
    torch.testing.assert_close(out.token_logits, tokens, equal_nan=True)
    col = tokens.nan_to_num(float("-inf")).argmax(1)
    assert torch.equal(out.culprit_column[has], col[has])
    block = events[torch.arange(4), :, col].argmax(1)
    assert torch.equal(out.culprit_block[has], block[has])
    assert int(out.culprit_block[2]) == -1 and torch.isnan(out.scores[2])
    torch.testing.assert_close(out.token_weights[has].sum(1), torch.ones(3))
    alone = v(values[1:2], valid[1:2])
    torch.testing.assert_close(alone.logits[0], out.logits[1], atol=1e-6, rtol=1e-6)


def test_ensemble_config_checks_and_older_formats():
    with pytest.raises(ValueError, match="members"):
        ValidatorConfig(num_features=F, members=0)
    d = ValidatorConfig(num_features=F).to_dict()
    assert d["format_version"] == 4 and d["members"] == 1
    d["format_version"] = 3
    d.pop("members")
    assert ValidatorConfig.from_dict(d).members == 1
    v = make_validator(members=2)
    assert "ensemble of 2" in v.model_card_text()


@pytest.mark.parametrize(
    ("summary", "says"),
    [
        ("last", "at the last answer token entering block(s) [1]"),
        ("mean", "entering block(s) [1] averaged over the answer's content tokens"),
        ("token_confidence", "the answer's token confidence"),
    ],
)
def test_card_says_what_the_state_branch_reads(summary, says):
    blocks, dim = ((0,), 3) if summary == "token_confidence" else ((1,), 4)
    cfg = ValidatorConfig(num_features=F, hidden=8, embed=4, gru_hidden=4, state_dim=dim, state_blocks=blocks)
    flow = FlowConfig(state_summary=summary)
    text = FlowValidator(cfg, flow_config=flow).model_card_text()
    assert says in text
    ens = FlowValidator(dataclasses.replace(cfg, members=2), flow_config=flow).model_card_text()
    assert says in ens  # a member has no flow_config of its own
