"""The shipped validator design learns: it fits a few dozen real extracted answers, and its parts behave."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config

from hf_flowcheck.detectors import FlowValidator, ValidatorConfig
from hf_flowcheck.extraction import FlowExtractor
from hf_flowcheck.workflows.training import train_validator


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """Tiny training steps run far faster on one thread, especially on a shared machine."""


@pytest.fixture(scope="module")
def tiny_answers():
    """48 'answers' of a tiny llama: lens + state features, random labels (fitting them = memorising)."""
    model = make_tiny_model("llama")
    ext = FlowExtractor(model, tiny_flow_config(lens_features=True, state_summary="last"))
    g = torch.Generator().manual_seed(0)
    n, prompt, answer = 48, 6, 5
    ids = torch.randint(2, 97, (n, prompt + answer), generator=g)
    resp = torch.zeros_like(ids)
    resp[:, prompt:] = 1
    feats = ext.extract(ids, response_mask=resp)
    labels = torch.tensor([0, 1] * (n // 2))[torch.randperm(n, generator=g)]
    return feats, labels


def shipped_config(feats, **kw) -> ValidatorConfig:
    base = dict(
        head="attention",
        input_transform="block_log_standardize",
        num_blocks=feats.num_blocks,
        block_embedding=4,
        event_layernorm=False,
        hidden=32,
        embed=16,
        gru_hidden=16,
        dropout=0.0,
    )
    base.update(kw)
    return ValidatorConfig.from_feature_names(feats.names, **base)


def _train_loss(model, feats, labels) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(feats.values, feats.valid, feats.states).logits
    w = torch.tensor(float((labels == 0).sum()) / float(labels.sum()))
    return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=w))


@pytest.mark.parametrize("with_state", [False, True], ids=["flow-only", "flow+state"])
def test_validator_fits_a_small_training_set(tiny_answers, with_state):
    feats, labels = tiny_answers
    kw = dict(state_dim=feats.states.shape[-1], state_blocks=(2, 4)) if with_state else {}
    cfg = shipped_config(feats, **kw)
    model, hist = train_validator(
        feats,
        labels,
        feats,
        labels,
        config=cfg,
        lr=1e-2,
        epochs=60,
        patience=60,
        batch_size=16,
        weight_decay=0.0,
        progress=False,
    )
    constant = 2 * (int((labels == 0).sum()) / len(labels)) * math.log(2)  # weighted BCE of p = 0.5
    assert hist.train_loss[0] == pytest.approx(constant, rel=0.3)
    assert _train_loss(model, feats, labels) < 0.5 * constant


def test_attention_head_culprit_is_the_largest_event(tiny_answers):
    feats, _ = tiny_answers
    model = FlowValidator(shipped_config(feats)).eval()
    model.fit_input_transform(feats.values, feats.valid)
    out = model.score_features(feats)
    flat = out.event_logits.reshape(len(feats), -1)
    arg = flat.argmax(1)
    t = feats.values.shape[2]
    assert torch.equal(out.culprit_block, arg // t) and torch.equal(out.culprit_column, arg % t)
    assert bool(torch.isfinite(out.scores).all()) and bool(((out.scores > 0) & (out.scores < 1)).all())
    # a row's score does not depend on the rest of the batch
    one = model.score_features(feats[3])
    assert one.scores[0].item() == pytest.approx(out.scores[3].item(), abs=1e-6)


def test_block_standardisation_is_per_block(tiny_answers):
    feats, _ = tiny_answers
    model = FlowValidator(shipped_config(feats))
    model.fit_input_transform(feats.values, feats.valid)
    z = model._transform_inputs(feats.values)
    for b in range(feats.num_blocks):
        ev = z[:, b][feats.valid[:, b]]
        assert ev.mean(0).abs().max().item() < 1e-3
        sd = ev.std(0)
        constant = ev.abs().max(0).values < 1e-3  # a feature constant in this block stays 0
        assert bool(((sd - 1).abs() < 1e-3)[~constant].all())


def test_state_branch_needs_states(tiny_answers):
    feats, _ = tiny_answers
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(4,))
    model = FlowValidator(cfg)
    with pytest.raises(ValueError, match="state_summary"):
        model(feats.values, feats.valid)
    with pytest.raises(ValueError, match="together"):
        shipped_config(feats, state_dim=8)
    with pytest.raises(ValueError, match="num_blocks"):
        ValidatorConfig(num_features=4, input_transform="block_log_standardize")
    with pytest.raises(ValueError, match="head"):
        ValidatorConfig(num_features=4, head="transformer")


def test_saved_flow_state_validator_round_trips(tiny_answers, tmp_path):
    feats, labels = tiny_answers
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4))
    model, _ = train_validator(feats, labels, feats, labels, config=cfg, epochs=2, progress=False)
    model.save_pretrained(tmp_path / "v")
    back = FlowValidator.from_pretrained(tmp_path / "v")
    assert back.config == model.config
    a, b = model.score_features(feats), back.score_features(feats)
    assert torch.equal(a.scores, b.scores)


def test_format_2_config_loads_as_the_spec_gru():
    d = ValidatorConfig(num_features=3).to_dict()
    d["format_version"] = 2
    for k in ("head", "num_blocks", "block_embedding", "state_dim", "state_blocks"):
        d.pop(k)
    assert ValidatorConfig.from_dict(d).head == "gru"


def test_lens_features_are_probabilities_and_ranks(tiny_answers):
    feats, _ = tiny_answers
    names = list(feats.names)
    top1, margin, ent, rank = (
        feats.values[..., names.index(n)] for n in ("lens_top1", "lens_margin", "lens_entropy", "lens_rank")
    )
    v = feats.valid
    assert bool(((top1[v] > 0) & (top1[v] <= 1)).all()) and bool((margin[v] >= 0).all()) and bool((ent[v] >= 0).all())
    # after the last block the lens is the model's own output: its preferred token has rank 0
    assert bool((rank[:, -1][v[:, -1]] == 0).all())
    assert feats.states.shape == (len(feats), feats.num_blocks + 1, 32)


def test_failed_save_leaves_the_old_folder_loadable(tiny_answers, tmp_path):
    feats, _ = tiny_answers
    model = FlowValidator(shipped_config(feats))
    model.fit_input_transform(feats.values, feats.valid)
    model.save_pretrained(tmp_path / "v")
    before = {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()}
    model.training_metadata["bad"] = torch.zeros(2)  # not JSON: the save must fail before touching the folder
    with pytest.raises((TypeError, ValueError)):
        model.save_pretrained(tmp_path / "v")
    assert {p.name: p.read_bytes() for p in (tmp_path / "v").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v"]  # no temporary folder left behind
    FlowValidator.from_pretrained(tmp_path / "v")
    (tmp_path / "file").write_text("x")
    del model.training_metadata["bad"]
    with pytest.raises(FileExistsError, match="is a file"):
        model.save_pretrained(tmp_path / "file")


@pytest.mark.parametrize("content", ["not json", "[1, 2]", "\xff\xfe"])
def test_damaged_config_json_is_named(tiny_answers, tmp_path, content):
    from hf_flowcheck.errors import CheckpointError

    feats, _ = tiny_answers
    FlowValidator(shipped_config(feats)).save_pretrained(tmp_path / "v")
    (tmp_path / "v" / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(CheckpointError, match=r"config\.json"):
        FlowValidator.from_pretrained(tmp_path / "v")


def test_save_keeps_files_it_does_not_write(tiny_answers, tmp_path):
    feats, _ = tiny_answers
    model = FlowValidator(shipped_config(feats))
    (tmp_path / "v" / "checkpoints").mkdir(parents=True)
    (tmp_path / "v" / "checkpoints" / "state.json").write_text("{}")
    (tmp_path / "v" / "evaluation.json").write_text("{}")
    model.save_pretrained(tmp_path / "v")
    model.save_pretrained(tmp_path / "v")
    names = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert names == ["README.md", "checkpoints", "config.json", "evaluation.json", "model.safetensors"]


def test_flow_state_validator_in_generate_equals_teacher_forced(tiny_answers):
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.fingerprint import model_fingerprint

    feats, labels = tiny_answers
    model = make_tiny_model("llama")
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4))
    v, _ = train_validator(feats, labels, feats, labels, config=cfg, epochs=2, progress=False,
                           flow_config=tiny_flow_config(lens_features=True, state_summary="last"))  # fmt: skip
    v.base_fingerprint = model_fingerprint(model)
    fc = FlowCheckedModelForCausalLM(model, v)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    out = fc.generate(input_ids=ids, max_new_tokens=5, do_sample=False, return_flow_scores=True,
                      return_flow_features=True, suppress_tokens=[98])  # fmt: skip
    assert out.flow_features.states is not None and len(out.flow_features.names) == 14
    resp = torch.zeros_like(out.sequences)
    resp[:, ids.shape[1] :] = 1
    replay = fc.extractor.extract(out.sequences, response_mask=resp)
    torch.testing.assert_close(out.flow_scores, v.score_features(replay).scores, atol=1e-5, rtol=1e-5)
    streamed = fc.generate(input_ids=ids, max_new_tokens=5, do_sample=False, return_flow_scores=True,
                           flow_check_every=2, suppress_tokens=[98])  # fmt: skip
    torch.testing.assert_close(streamed.flow_scores, out.flow_scores, atol=1e-5, rtol=1e-5)
