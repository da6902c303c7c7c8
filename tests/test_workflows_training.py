"""train_validator: learns a planted signal, selects on validation, is seeded and resumes exactly."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from hf_flowcheck.detectors import FlowValidator, ValidatorConfig
from hf_flowcheck.extraction import FlowFeatures
from hf_flowcheck.metrics import auroc
from hf_flowcheck.workflows.training import STATE_JSON, STATE_NAME, TrainingHistory, train_validator

B, T, F = 3, 5, 6
NAMES = tuple(f"f{i}" for i in range(F))
# Planted signal on signed Gaussian features: plain standardization (log1p suits the real, non-negative ones).
SMALL = ValidatorConfig.from_feature_names(
    NAMES, hidden=32, embed=16, gru_hidden=16, dropout=0.1, input_transform="standardize"
)
FAST = dict(config=SMALL, lr=3e-3, batch_size=16, progress=False)


def planted(n: int, seed: int, pos_rate: float = 0.5) -> tuple[FlowFeatures, torch.Tensor]:
    """Random features; in hallucinated samples one valid event has feature 0 raised by 6."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, B, T, F, generator=g)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    cols = torch.arange(T)[None, :] < lengths[:, None]  # [N, T]
    valid = cols[:, None, :].expand(n, B, T).clone()
    labels = (torch.rand(n, generator=g) < pos_rate).long()
    for i in torch.nonzero(labels).flatten().tolist():
        b = int(torch.randint(0, B, (1,), generator=g))
        t = int(torch.randint(0, int(lengths[i]), (1,), generator=g))
        values[i, b, t, 0] += 6.0
    values = values * valid[..., None]
    positions = torch.where(cols, torch.arange(T)[None, :] + 4, torch.full_like(cols, -1, dtype=torch.long))
    return FlowFeatures(values, valid, positions, NAMES), labels


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny training steps run far faster on one thread, especially on a shared machine."""


@pytest.fixture(scope="module")
def data():
    return planted(240, 0), planted(80, 1), planted(120, 2)


def _weights(model: FlowValidator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("selection", ["val_auroc", "val_loss"])
def test_learns_planted_signal_and_selects_on_validation(data, selection):
    (tr, ytr), (va, yva), (te, yte) = data
    rng_before = torch.get_rng_state()
    model, hist = train_validator(tr, ytr, va, yva, epochs=12, patience=4, selection=selection, **FAST)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    assert isinstance(hist, TrainingHistory)
    assert len(hist.val_loss) == len(hist.val_auroc) == hist.epochs_run
    if selection == "val_auroc":
        assert hist.best_val_auroc == max(hist.val_auroc)
    else:
        assert hist.best_val_loss == min(hist.val_loss)
        assert hist.val_loss[hist.best_epoch - 1] == hist.best_val_loss
    assert hist.val_auroc[hist.best_epoch - 1] == hist.best_val_auroc
    assert hist.best_val_auroc > 0.9
    test_auc = auroc(yte.numpy(), model.score_features(te).scores.numpy())
    assert test_auc > 0.9
    assert not model.training
    # the kept weights are the best-validation ones
    val_auc = auroc(yva.numpy(), model.score_features(va).scores.numpy())
    assert val_auc == pytest.approx(hist.best_val_auroc, abs=1e-9)
    meta = model.training_metadata
    assert meta["hyperparameters"]["lr"] == 3e-3 and meta["history"]["best_epoch"] == hist.best_epoch
    assert hist.pos_weight == pytest.approx(int((ytr == 0).sum()) / int(ytr.sum()))


def test_same_seed_same_weights(data):
    (tr, ytr), (va, yva), _ = data
    a, ha = train_validator(tr, ytr, va, yva, epochs=2, seed=3, **FAST)
    b, hb = train_validator(tr, ytr, va, yva, epochs=2, seed=3, **FAST)
    c, _ = train_validator(tr, ytr, va, yva, epochs=2, seed=4, **FAST)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert ha.train_loss == hb.train_loss


def test_resume_equals_uninterrupted(tmp_path, data):
    (tr, ytr), (va, yva), _ = data
    # patience large so that both runs go the full 4 epochs
    full, hfull = train_validator(tr, ytr, va, yva, epochs=4, patience=10, **FAST)
    _, hpart = train_validator(tr, ytr, va, yva, epochs=2, patience=10, checkpoint_dir=tmp_path, **FAST)
    assert hpart.epochs_run == 2 and hpart.resumed_from_epoch is None
    assert (tmp_path / STATE_NAME).exists() and (tmp_path / STATE_JSON).exists()
    state = json.loads((tmp_path / STATE_JSON).read_text())
    assert state["epoch"] == 2 and state["best_epoch"] == hpart.best_epoch
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob(".*tmp*"))
    assert (tmp_path / "best" / "model.safetensors").exists()
    resumed, hres = train_validator(tr, ytr, va, yva, epochs=4, patience=10, checkpoint_dir=tmp_path, **FAST)
    assert hres.resumed_from_epoch == 2 and hres.epochs_run == 4
    assert hres.val_auroc == hfull.val_auroc and hres.train_loss == hfull.train_loss
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    # a finished run returns at once with the same weights
    again, hagain = train_validator(tr, ytr, va, yva, epochs=4, patience=10, checkpoint_dir=tmp_path, **FAST)
    assert hagain.epochs_run == 4 and all(torch.equal(wf[k], v) for k, v in _weights(again).items())
    # another run's settings are refused
    with pytest.raises(ValueError, match=r"different training run.*lr"):
        train_validator(tr, ytr, va, yva, epochs=5, checkpoint_dir=tmp_path, **{**FAST, "lr": 1e-2})


def test_corrupt_state_is_refused(tmp_path, data):
    (tr, ytr), (va, yva), _ = data
    (tmp_path / STATE_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="Cannot resume"):
        train_validator(tr, ytr, va, yva, epochs=1, checkpoint_dir=tmp_path, **FAST)


def test_early_stopping(data):
    (tr, ytr), (va, yva), _ = data
    _, hist = train_validator(tr, ytr, va, yva, epochs=10, patience=1, **{**FAST, "lr": 1e-12})
    assert hist.stopped_early and hist.epochs_run == 2 and hist.best_epoch == 1


def test_rows_without_events_are_skipped(data, caplog):
    (tr, ytr), (va, yva), _ = data
    tr2 = FlowFeatures(tr.values.clone(), tr.valid.clone(), tr.positions, NAMES)
    tr2.valid[:3] = False
    va2 = FlowFeatures(va.values.clone(), va.valid.clone(), va.positions, NAMES)
    va2.valid[0] = False
    with caplog.at_level(logging.WARNING, logger="hf_flowcheck.workflows.training"):
        _, hist = train_validator(tr2, ytr, va2, yva, epochs=1, **FAST)
    assert hist.skipped_train == 3 and hist.skipped_val == 1
    assert "skipping 3 train and 1 validation rows" in caplog.text


def test_input_errors(data):
    (tr, ytr), (va, yva), _ = data
    with pytest.raises(ValueError, match=r"only 0 and 1.*\['2.0'\]"):
        train_validator(tr, torch.where(ytr == 1, 2, 0), va, yva, **FAST)
    with pytest.raises(ValueError, match="one 0/1 label per sample"):
        train_validator(tr, ytr[:-1], va, yva, **FAST)
    with pytest.raises(ValueError, match="train split is empty"):
        train_validator(tr[0:0], ytr[:0], va, yva, **FAST)
    with pytest.raises(ValueError, match="val split is empty"):
        train_validator(tr, ytr, va[0:0], yva[:0], **FAST)
    with pytest.raises(ValueError, match="validation split has only class"):
        train_validator(tr, ytr, va, torch.zeros_like(yva), **FAST)
    with pytest.raises(ValueError, match="epochs=0"):
        train_validator(tr, ytr, va, yva, epochs=0, **FAST)
    with pytest.raises(ValueError, match="num_features=8"):
        train_validator(tr, ytr, va, yva, **{**FAST, "config": ValidatorConfig(num_features=8)})
    other = FlowFeatures(va.values, va.valid, va.positions, tuple(reversed(NAMES)))
    with pytest.raises(ValueError, match="train and val features differ"):
        train_validator(tr, ytr, other, yva, **FAST)
    with pytest.raises(ValueError, match="must be FlowFeatures"):
        train_validator(tr.values, ytr, va, yva, **FAST)


# ---------------------------------------------------------------------------------------------
# Calibration (Platt scaling of the logit on validation answers)
# ---------------------------------------------------------------------------------------------


def test_calibration_keeps_ranking_and_culprit_and_fixes_the_rate(data, tmp_path):
    from hf_flowcheck.metrics import expected_calibration_error
    from hf_flowcheck.workflows.experiments import calibrate_validator

    (tr, ytr), _, _ = data
    va, yva = planted(200, 5, pos_rate=0.85)  # another base rate than training's balanced one
    te, yte = planted(200, 6, pos_rate=0.85)
    model, _ = train_validator(tr, ytr, va, yva, epochs=6, patience=3, **FAST)
    model.eval()
    before = model.score_features(te)
    info = calibrate_validator(model, va, yva)
    after = model.score_features(te)
    assert info["method"] == "platt" and info["scale"] > 0 and model.calibration == (info["scale"], info["bias"])
    assert info["ece_after"] <= info["ece_before"]
    # a positive affine map of the logits: same order, same culprit, same token order
    assert torch.equal(before.logits.argsort(), after.logits.argsort())
    assert torch.equal(before.culprit_block, after.culprit_block)
    assert torch.equal(before.culprit_column, after.culprit_column)
    torch.testing.assert_close(after.logits, before.logits * info["scale"] + info["bias"])
    assert expected_calibration_error(yte.numpy(), after.scores.numpy()) < expected_calibration_error(
        yte.numpy(), before.scores.numpy()
    )
    points = model.training_metadata["operating_points"]
    assert points["chosen_on"] == "validation" and points["precision_0.8"]["precision"] >= 0.8
    # saved and loaded with its map; the model card says how it was fitted
    model.save_pretrained(tmp_path / "v")
    again = FlowValidator.from_pretrained(tmp_path / "v")
    assert again.calibration == model.calibration
    torch.testing.assert_close(again.eval().score_features(te).scores, after.scores)
    assert "## Calibration" in (tmp_path / "v" / "README.md").read_text()


def test_a_file_without_a_logit_map_loads_as_the_identity(tmp_path):
    from safetensors.torch import load_file, save_file

    model = FlowValidator(SMALL)
    model.save_pretrained(tmp_path / "v")
    path = tmp_path / "v" / "model.safetensors"
    state = {k: v for k, v in load_file(str(path)).items() if k != "logit_calibration"}
    save_file(state, str(path))
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    cfg.pop("weights_sha256", None)  # an older artifact had no weights or config hash either
    cfg.pop("config_sha256", None)
    (tmp_path / "v" / "config.json").write_text(json.dumps(cfg))
    assert FlowValidator.from_pretrained(tmp_path / "v").calibration == (1.0, 0.0)


def test_calibration_refuses_what_it_cannot_fit(data):
    from hf_flowcheck.workflows.experiments import calibrate_validator

    (tr, ytr), (va, yva), _ = data
    model = FlowValidator(SMALL).eval()
    with pytest.raises(ValueError, match="positive finite"):
        model.set_calibration(-1.0, 0.0)
    with pytest.raises(ValueError, match="positive finite"):
        model.set_calibration(1.0, float("nan"))
    one_class = torch.ones_like(yva)
    model.set_calibration(2.0, 1.0)
    info = calibrate_validator(model, va, one_class)
    assert "one class" in info["skipped"] and model.calibration == (1.0, 0.0)
    flipped = 1 - yva  # a validator trained on yva ranks the flipped labels the wrong way round
    trained, _ = train_validator(tr, ytr, va, yva, epochs=6, patience=3, **FAST)
    info = calibrate_validator(trained.eval(), va, flipped)
    assert "wrong way round" in info["skipped"] and trained.calibration == (1.0, 0.0)


def test_operating_points_per_prompt_style(data, tmp_path):
    from hf_flowcheck.workflows.experiments import calibrate_validator

    (tr, ytr), _, _ = data
    va, yva = planted(240, 7, pos_rate=0.6)
    model, _ = train_validator(tr, ytr, va, yva, epochs=6, patience=3, **FAST)
    styles = ["chat"] * 120 + ["plain"] * 110 + ["rare"] * 10  # a style with < 20 answers gets no points
    calibrate_validator(model.eval(), va, yva, groups=styles)
    groups = model.training_metadata["operating_points_by_group"]
    assert sorted(groups) == ["chat", "plain"] and groups["chat"]["n"] == 120
    scores = model.score_features(va).scores.numpy()
    for style, rows in (("chat", slice(0, 120)), ("plain", slice(120, 230))):
        t = model.recommended_threshold("precision_0.8", prompt_style=style)
        flagged = scores[rows] >= t
        assert flagged.any() and yva.numpy()[rows][flagged].mean() >= 0.8  # the promise holds where it was chosen
    assert model.recommended_threshold("precision_0.9") >= 0.0
    with pytest.raises(ValueError, match=r"prompt_style='rare'.*'chat', 'plain'"):
        model.recommended_threshold(prompt_style="rare")
    model.save_pretrained(tmp_path / "v")
    assert "| chat | 120 |" in (tmp_path / "v" / "README.md").read_text()
