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


@pytest.mark.parametrize(
    "with_state, head",
    [(False, "attention"), (True, "attention"), (False, "depth"), (False, "ensemble")],
    ids=["flow-only", "flow+state", "depth-head", "ensemble"],
)
def test_validator_fits_a_small_training_set(tiny_answers, with_state, head):
    feats, labels = tiny_answers
    kw = dict(state_dim=feats.states.shape[-1], state_blocks=(2, 4)) if with_state else {}
    if head == "ensemble":
        head, kw = "attention", dict(members=3)
    cfg = shipped_config(feats, head=head, **kw)
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


@pytest.mark.parametrize("head", ["attention", "depth"])
def test_probe_initialised_state_branch_starts_at_the_probe(tiny_answers, head):
    from hf_flowcheck.detectors.baselines import train_logistic_regression

    feats, labels = tiny_answers
    tr, va = slice(0, 32), slice(32, 48)
    cfg = shipped_config(feats, head=head, state_dim=feats.states.shape[-1], state_blocks=(2, 4))
    # epochs that only make things worse on validation (a huge learning rate): the probe itself is kept
    model, hist = train_validator(
        feats[tr], labels[tr], feats[va], labels[va], config=cfg, lr=5.0, epochs=2, patience=5,
        state_init="probe", progress=False,
    )  # fmt: skip
    sel = feats.states[tr][:, [2, 4]]
    mu, sd = sel.mean(0), sel.std(0).clamp_min(1e-6)
    w, b = train_logistic_regression(((sel - mu) / sd).reshape(32, -1), labels[tr])
    z = ((feats.states[va][:, [2, 4]] - mu) / sd).reshape(16, -1).double()
    probe_logits = (z @ w + b).numpy()
    got = model.score_features(feats[va]).logits.double().numpy()
    assert hist.best_epoch == 0 and hist.epochs_run == 2
    shift = got - probe_logits  # the event head is zero: the score is the probe's, shifted by log(pos_weight)
    assert abs(shift - shift.mean()).max() < 1e-4
    assert shift.mean() == pytest.approx(math.log(hist.pos_weight), abs=1e-4)
    assert hist.best_val_loss <= min(hist.val_loss) + 1e-12
    assert hist.to_dict()["best_epoch"] == hist.best_epoch
    assert model.training_metadata["hyperparameters"]["state_init"] == "probe"
    with pytest.raises(ValueError, match="state_init"):
        train_validator(feats, labels, feats, labels, config=shipped_config(feats), state_init="probe", epochs=1)
    with pytest.raises(ValueError, match="state_init"):
        train_validator(feats, labels, feats, labels, config=cfg, state_init="lbfgs", epochs=1)
    ens = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4), members=2)
    with pytest.raises(ValueError, match="members=2"):
        train_validator(feats, labels, feats, labels, config=ens, state_init="probe", epochs=1)
    # frozen: the state branch ends where it started, whatever the flow part learned
    frozen, _ = train_validator(feats[tr], labels[tr], feats[va], labels[va], config=cfg, lr=1e-2, epochs=3,
                                patience=5, state_init="frozen-probe", progress=False)  # fmt: skip
    torch.testing.assert_close(frozen.state_head.weight, model.state_head.weight)
    assert all(q.requires_grad for q in frozen.parameters())


def test_probe_states_widen_the_probe_and_nothing_else(tiny_answers):
    """Answers with states but no flow features: the probe and the state scaling are fitted on them too."""
    from hf_flowcheck.detectors.baselines import train_logistic_regression

    feats, labels = tiny_answers
    tr, va, extra = slice(0, 20), slice(32, 48), slice(20, 32)
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4))
    kw = {"config": cfg, "lr": 5.0, "epochs": 1, "patience": 5, "state_init": "frozen-probe", "progress": False}
    model, hist = train_validator(
        feats[tr], labels[tr], feats[va], labels[va], probe_states=(feats.states[extra], labels[extra]), **kw
    )
    both = slice(0, 32)  # the union, in order: the train rows, then the extra answers
    sel = feats.states[both][:, [2, 4]]
    mu, sd = sel.mean(0), sel.std(0).clamp_min(1e-6)
    torch.testing.assert_close(model.state_shift, mu)
    torch.testing.assert_close(model.state_scale, sd)
    w, b = train_logistic_regression(((sel - mu) / sd).reshape(32, -1), labels[both])
    torch.testing.assert_close(model.state_head.weight[0].double(), w, atol=1e-5, rtol=1e-4)
    assert model.state_head.bias.item() == pytest.approx(float(b) + math.log(hist.pos_weight), abs=1e-4)
    assert hist.best_epoch == 0  # lr=5 only makes things worse: the wider probe is what is kept
    assert "12 answers" in model.training_metadata["hyperparameters"]["probe_states"]
    alone, _ = train_validator(feats[tr], labels[tr], feats[va], labels[va], **kw)
    assert not torch.allclose(alone.state_head.weight, model.state_head.weight)
    with pytest.raises(ValueError, match="state_init='random'"):
        train_validator(feats[tr], labels[tr], feats[va], labels[va], **{**kw, "state_init": "random"},
                        probe_states=(feats.states[extra], labels[extra]))  # fmt: skip
    with pytest.raises(ValueError, match="like the train features"):
        train_validator(feats[tr], labels[tr], feats[va], labels[va], probe_states=(feats.states[extra, :2], labels[extra]),
                        **kw)  # fmt: skip
    with pytest.raises(ValueError, match="0 or 1"):
        train_validator(feats[tr], labels[tr], feats[va], labels[va], probe_states=(feats.states[extra], labels[extra] * 2 + 1),
                        **kw)  # fmt: skip


def test_attention_head_culprit_is_the_riskiest_token(tiny_answers):
    feats, _ = tiny_answers
    model = FlowValidator(shipped_config(feats)).eval()
    model.fit_input_transform(feats.values, feats.valid)
    out = model.score_features(feats)
    col = out.token_logits.nan_to_num(float("-inf")).argmax(1)
    assert torch.equal(out.culprit_column, col)
    assert torch.equal(out.culprit_block, out.event_logits[torch.arange(len(feats)), :, col].argmax(1))
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


@pytest.mark.parametrize("head", ["attention", "depth", "ensemble"])
def test_saved_flow_state_validator_round_trips(tiny_answers, tmp_path, head):
    feats, labels = tiny_answers
    kw = dict(head="attention", members=2) if head == "ensemble" else dict(head=head)
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4), **kw)
    model, _ = train_validator(feats, labels, feats, labels, config=cfg, epochs=2, progress=False)
    model.save_pretrained(tmp_path / "v")
    back = FlowValidator.from_pretrained(tmp_path / "v")
    assert back.config == model.config
    a, b = model.score_features(feats), back.score_features(feats)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.culprit_position, b.culprit_position) and torch.equal(a.culprit_block, b.culprit_block)
    assert (head if head != "ensemble" else "ensemble of 2") in back.model_card_text()


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


@pytest.mark.parametrize("head", ["attention", "depth", "ensemble"])
def test_flow_state_validator_in_generate_equals_teacher_forced(tiny_answers, head):
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.fingerprint import model_fingerprint

    feats, labels = tiny_answers
    model = make_tiny_model("llama")
    kw = dict(head="attention", members=2) if head == "ensemble" else dict(head=head)
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2, 4), **kw)
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
    # the culprit that refinement rolls back to is the validator's own
    ref = v.score_features(replay)
    assert torch.equal(out.flow_culprits[:, 1], ref.culprit_block)
    assert torch.equal(out.flow_culprits[:, 0], ref.culprit_position)
    refined = fc.refine(out, threshold=0.0, suppress_tokens=[98])
    for row in refined.rows:  # rolled back to the validator's culprit
        assert tuple(row.culprit_before) == (int(ref.culprit_position[row.row]), int(ref.culprit_block[row.row]))
    assert refined.rows


def _lens_wrapped(tiny_answers):
    """A tiny llama with a flow + lens validator (trained one epoch) and two 6-token prompts."""
    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.fingerprint import model_fingerprint

    feats, labels = tiny_answers
    model = make_tiny_model("llama")
    v, _ = train_validator(feats, labels, feats, labels, config=shipped_config(feats), epochs=1, progress=False,
                           flow_config=tiny_flow_config(lens_features=True))  # fmt: skip
    v.base_fingerprint = model_fingerprint(model)
    return FlowCheckedModelForCausalLM(model, v), torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


def test_streaming_computes_each_token_lens_once_and_scores_as_without_cache(tiny_answers, monkeypatch):
    import hf_flowcheck.extraction as extraction

    fc, ids = _lens_wrapped(tiny_answers)
    kw = dict(input_ids=ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, return_flow_scores=True,
              flow_check_every=1, suppress_tokens=[98])  # fmt: skip
    rows_read = []
    real = extraction.lens_features
    monkeypatch.setattr(extraction, "lens_features", lambda r, *a: rows_read.append(r.shape[0]) or real(r, *a))
    cached = fc.generate(**kw)
    assert sum(rows_read) == 2 * 6  # every generated token of both rows, once, over 5 checks and the end
    real_features_from_states = extraction.FlowExtractor.features_from_states
    monkeypatch.setattr(
        extraction.FlowExtractor,
        "features_from_states",
        lambda self, *a: real_features_from_states(self, *a[:4]),  # drop the cache: recompute at every check
    )
    rows_read.clear()
    fresh = fc.generate(**kw)
    assert sum(rows_read) > 2 * 6
    torch.testing.assert_close(cached.flow_running_scores, fresh.flow_running_scores, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cached.flow_scores, fresh.flow_scores, atol=1e-6, rtol=1e-6)


def test_lens_candidates_over_the_whole_vocabulary_are_exact(tiny_answers):
    model = make_tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20]])
    resp = torch.zeros_like(ids)
    resp[:, 5:] = 1
    vocab = model.get_output_embeddings().weight.shape[0]
    exact = FlowExtractor(model, tiny_flow_config(lens_features=True)).extract(ids, response_mask=resp)
    whole = FlowExtractor(model, tiny_flow_config(lens_features=True, lens_candidates=vocab)).extract(
        ids, response_mask=resp
    )
    torch.testing.assert_close(whole.values, exact.values, atol=1e-5, rtol=1e-4)
    few = FlowExtractor(model, tiny_flow_config(lens_features=True, lens_candidates=8)).extract(ids, response_mask=resp)
    names = list(few.names)
    torch.testing.assert_close(few.values[..., :10], exact.values[..., :10])  # the spec's features do not change
    rank = few.values[..., names.index("lens_rank")]
    assert float(rank.max()) <= math.log1p(7) + 1e-6
    assert bool((rank[:, -1][few.valid[:, -1]] == 0).all())  # the last block still prefers its own choice
    # at the last block the top token is the same, and the normaliser over 8 rows is the smaller one
    top1, top1_exact = few.values[:, -1, :, names.index("lens_top1")], exact.values[:, -1, :, names.index("lens_top1")]
    assert bool((top1[few.valid[:, -1]] >= top1_exact[few.valid[:, -1]] - 1e-6).all())


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(lens_features=True, lens_candidates=2), "num_competitors"),
        (dict(lens_features=True, lens_candidates=-1), "lens_candidates"),
        (dict(lens_features=True, lens_candidates=True), "lens_candidates"),
        (dict(lens_candidates=64), "lens_features=True"),
    ],
)
def test_bad_lens_candidates_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny_flow_config(**kw)


def test_doubling_refit_is_exact_where_it_refits_and_at_the_end(tiny_answers, monkeypatch):
    import hf_flowcheck.extraction as extraction

    fc, ids = _lens_wrapped(tiny_answers)
    kw = dict(input_ids=ids, max_new_tokens=9, min_new_tokens=9, do_sample=False, return_flow_scores=True,
              flow_check_every=1, suppress_tokens=[98])  # fmt: skip
    fits = []
    real = extraction.fit_sample_bases
    monkeypatch.setattr(extraction, "fit_sample_bases", lambda h, *a: fits.append(h.shape[0]) or real(h, *a))
    always = fc.generate(**kw)
    n_always = len(fits)
    fits.clear()
    doubling = fc.generate(**kw, flow_check_refit="doubling")
    # checks after 1..8 tokens: fits at 1, 2, 4 and 8 tokens (per row), then the final (exact) fit at 9
    assert fits == [1, 1, 2, 2, 4, 4, 8, 8, 9, 9] and n_always == 2 * 9
    assert always.flow_check_steps.tolist() == doubling.flow_check_steps.tolist() == list(range(1, 9))
    refit = [0, 1, 3, 7]  # the checks after 1, 2, 4 and 8 tokens
    torch.testing.assert_close(doubling.flow_running_scores[refit], always.flow_running_scores[refit])
    torch.testing.assert_close(doubling.flow_scores, always.flow_scores)
    torch.testing.assert_close(doubling.sequences, always.sequences)
    with pytest.raises(ValueError, match="flow_check_refit"):
        fc.generate(input_ids=ids, max_new_tokens=2, return_flow_scores=True, flow_check_every=1, flow_check_refit="x")
    with pytest.raises(ValueError, match="needs flow_check_every"):
        fc.generate(input_ids=ids, max_new_tokens=2, return_flow_scores=True, flow_check_refit="doubling")


def test_prefix_augmentation_cuts_rows_to_prefixes_and_refuses_the_state_branch(tiny_answers):
    from hf_flowcheck.workflows.training import _random_prefixes

    feats, labels = tiny_answers
    valid = feats.valid.clone()
    valid[0, :, 2:] = False  # a 2-token answer
    valid[1, :, 1:] = False  # a 1-token answer is never cut
    cut = _random_prefixes(valid, 1.0, torch.Generator().manual_seed(0))
    n_before, n_after = valid.any(1).sum(-1), cut.any(1).sum(-1)
    assert bool((n_after >= 1).all()) and bool((n_after[n_before > 1] < n_before[n_before > 1]).all())
    assert n_after[0] == 1 and n_after[1] == 1
    cols = torch.arange(valid.shape[-1])
    assert torch.equal(cut, valid & (cols[None, None, :] < n_after[:, None, None]))  # a prefix, every block
    assert torch.equal(_random_prefixes(valid, 0.0, torch.Generator().manual_seed(0)), valid)
    model, hist = train_validator(feats, labels, feats, labels, config=shipped_config(feats), epochs=2,
                                  prefix_augment=0.5, progress=False)  # fmt: skip
    assert model.training_metadata["hyperparameters"]["prefix_augment"] == 0.5 and hist.epochs_run == 2
    cfg = shipped_config(feats, state_dim=feats.states.shape[-1], state_blocks=(2,))
    with pytest.raises(ValueError, match="prefix_augment"):
        train_validator(feats, labels, feats, labels, config=cfg, prefix_augment=0.5, epochs=1)
    with pytest.raises(ValueError, match="prefix_augment"):
        train_validator(feats, labels, feats, labels, config=shipped_config(feats), prefix_augment=1.5, epochs=1)


def test_token_loss_teaches_the_token_logits_a_token_target(tiny_answers):
    feats, labels = tiny_answers
    # A learnable token target: the sign of one feature at the token's first block.
    target = (feats.values[:, 0, :, 0] > feats.values[:, 0, :, 0].median()).float()
    target = target.masked_fill(~feats.valid.any(1), float("nan"))
    kw = dict(config=shipped_config(feats), lr=1e-2, epochs=40, patience=40, batch_size=16, weight_decay=0.0,
              progress=False)  # fmt: skip
    plain, _ = train_validator(feats, labels, feats, labels, **kw)
    taught, _ = train_validator(feats, labels, feats, labels, token_labels=target, token_loss_weight=1.0, **kw)
    from hf_flowcheck.metrics import auroc

    def token_auroc(model):
        out = model(feats.values, feats.valid).token_logits
        use = torch.isfinite(target) & torch.isfinite(out)
        return auroc(target[use].numpy(), out[use].detach().numpy())

    assert token_auroc(taught) > 0.9 and token_auroc(taught) > token_auroc(plain) + 0.1
    assert taught.training_metadata["hyperparameters"]["token_loss_weight"] == 1.0
    with pytest.raises(ValueError, match="needs token_labels"):
        train_validator(feats, labels, feats, labels, token_loss_weight=1.0, epochs=1, progress=False)
    with pytest.raises(ValueError, match="token_labels has shape"):
        train_validator(feats, labels, feats, labels, token_labels=target[:, :2], token_loss_weight=1.0, epochs=1)
    with pytest.raises(ValueError, match="token_loss_weight"):
        train_validator(feats, labels, feats, labels, token_labels=target, token_loss_weight=-1.0, epochs=1)


def test_reference_token_labels_mark_unsupported_words_of_wrong_answers():
    from types import SimpleNamespace

    from test_baselines import CharTokenizer

    from hf_flowcheck.extraction import FlowFeatures
    from hf_flowcheck.workflows.token_labels import reference_token_labels

    tok = CharTokenizer()
    prompt = "Q?"
    start = len(tok(prompt)["input_ids"])
    answer = "ab x"  # one character per token: 'a', 'b', ' ', 'x'
    gen = tok(answer, add_special_tokens=False)["input_ids"]
    rec = SimpleNamespace(prompt=prompt, gen_ids=gen, references=["Cab"])
    pos = torch.tensor([[start, start + 1, start + 2, start + 3, -1]] * 2)
    feats = FlowFeatures(torch.zeros(2, 1, 5, 1), torch.ones(2, 1, 5, dtype=torch.bool), pos, ("f",), [0, 1])
    out = reference_token_labels(feats, ["u0", "u1"], {"u0": rec, "u1": rec}, tok, [1, 0])
    assert out[0, :2].tolist() == [0.0, 0.0] and out[0, 3].item() == 1.0  # 'a', 'b' in "cab"; 'x' is not
    assert torch.isnan(out[0, 2]) and torch.isnan(out[0, 4])  # a space has no word; -1 is padding
    assert out[1, [0, 1, 3]].tolist() == [0.0, 0.0, 0.0]  # a right answer's tokens are all supported
    with pytest.raises(ValueError, match="no answer record"):
        reference_token_labels(feats, ["u0", "missing"], {"u0": rec}, tok, [1, 0])


def test_the_question_rule_leaves_the_restated_question_and_function_words_out():
    from hf_flowcheck.workflows.token_labels import question_of, word_labels, words

    prompt = "<|im_start|>user\nAnswer briefly.\n\nQuestion: In what city was Bert Myers born?<|im_end|>\n"
    q = question_of(prompt)
    assert "Bert Myers" in q and "Answer briefly" not in q
    ws = words("Bert Myers was born in Manchester, United Kingdom.")
    refs = ["Frederick, Maryland"]
    assert word_labels(ws, refs) == [1] * 8  # every word is missing from the references
    assert word_labels(ws, refs, q, "references+question") == [0, 0, None, 0, None, 1, 1, 1]
    assert word_labels(words("Frederick"), refs, q, "references+question") == [0]
    with pytest.raises(ValueError, match="rule="):
        word_labels(ws, refs, q, "question")
