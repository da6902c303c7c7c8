"""Validator files: save/load round trips, strict loading, offline Hub cache, mocked push, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import huggingface_hub
import pytest
import torch
from conftest import make_tiny_model, tiny_flow_config
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_flowcheck import FlowExtractor
from hf_flowcheck.detectors import CheckpointError, FlowValidator, ValidatorConfig
from hf_flowcheck.fingerprint import (
    FingerprintMismatchError,
    check_fingerprint,
    model_fingerprint,
    readout_sha256,
)
from hf_flowcheck.metrics import evaluate_scores

SMALL = dict(hidden=24, embed=12, gru_hidden=16)


@pytest.fixture(scope="module")
def llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="module")
def extracted(llama):
    ext = FlowExtractor(llama, tiny_flow_config())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 97, (4, 9), generator=gen)
    resp = torch.zeros_like(ids)
    resp[:, 5:] = 1
    return ext.extract(ids, response_mask=resp)


@pytest.fixture(scope="module")
def validator(llama, extracted):
    torch.manual_seed(0)
    v = FlowValidator(
        ValidatorConfig.from_feature_names(extracted.names, **SMALL),
        flow_config=tiny_flow_config(),
    )
    v.set_base_model(llama)
    res = evaluate_scores([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.6], n_bootstrap=20, name="flow validator / test")
    v.record_evaluation(res, command="flowcheck train --model tiny-llama --epochs 3", protocol="paired")
    return v.eval()


def _files(folder: Path) -> set[str]:
    return {p.name for p in Path(folder).iterdir()}


def test_round_trip_scores_identically(tmp_path, validator, extracted, llama):
    validator.save_pretrained(tmp_path / "v")
    assert {"config.json", "model.safetensors", "README.md"} <= _files(tmp_path / "v")
    loaded = FlowValidator.from_pretrained(tmp_path / "v", base_model=llama)
    assert not loaded.training
    a, b = validator.score_features(extracted), loaded.score_features(extracted)
    assert torch.equal(a.scores, b.scores)
    assert torch.equal(a.culprit_position, b.culprit_position)
    assert loaded.config == validator.config
    assert loaded.flow_config == tiny_flow_config()
    assert loaded.base_fingerprint == validator.base_fingerprint
    assert loaded.training_metadata["command"].startswith("flowcheck train")
    # culprits point at answer tokens
    assert set(b.culprit_position.tolist()) <= set(range(5, 9))


def test_config_json_and_model_card(tmp_path, validator):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["library"] == "hf_flowcheck" and cfg["format_version"] == 1 and cfg["hf_flowcheck_version"]
    assert cfg["validator_config"]["num_features"] == 10
    assert cfg["flow_config"]["window_length"] == 2
    assert set(cfg["base_fingerprint"]) >= {"model_type", "num_blocks", "hidden_size", "vocab_size", "readout_sha256"}
    assert cfg["training_metadata"]["evaluation"]["metrics"]["auroc"]["value"] == 1.0
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: hf_flowcheck")
    assert "flow validator / test" in card and "auroc" in card  # the format_table rows
    assert "flowcheck train --model tiny-llama --epochs 3" in card
    assert "higher = more likely hallucinated" in card
    # saving again refreshes the card
    validator.training_metadata["command"] = "flowcheck train --epochs 4"
    validator.save_pretrained(tmp_path)
    assert "--epochs 4" in (tmp_path / "README.md").read_text()
    validator.training_metadata["command"] = "flowcheck train --model tiny-llama --epochs 3"
    # the card parses as a Hub model card
    assert huggingface_hub.ModelCard.load(tmp_path / "README.md").data.library_name == "hf_flowcheck"


def test_later_evaluations_get_their_own_card_sections(tmp_path, validator):
    from hf_flowcheck.metrics import evaluate_scores

    before = dict(validator.training_metadata)
    held = {"validator": evaluate_scores([0, 1, 0, 1], [0.1, 0.9, 0.4, 0.3], name="validator", n_bootstrap=10)}
    validator.record_later_evaluation("Held out: 4 newer answers", held, command="python benchmarks/held_out.py")
    validator.record_later_evaluation("Held out: 4 newer answers", held, command="python benchmarks/held_out.py -x")
    assert len(validator.training_metadata["later_evaluations"]) == 1  # the same title replaces, not repeats
    assert validator.training_metadata["evaluation"] == before["evaluation"]  # training's own stays
    validator.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "### Held out: 4 newer answers" in card and "held_out.py -x" in card
    assert FlowValidator.from_pretrained(tmp_path).training_metadata["later_evaluations"][0]["command"].endswith("-x")
    with pytest.raises(ValueError, match="evaluate_scores"):
        validator.record_later_evaluation("bad", {"validator": {"auroc": 0.5}}, command="x")
    validator.training_metadata = before


def test_non_json_metadata_is_refused(tmp_path):
    v = FlowValidator(ValidatorConfig(num_features=4, **SMALL), training_metadata={"bad": object()})
    with pytest.raises(ValueError, match=r"cannot be written to config.json"):
        v.save_pretrained(tmp_path)


def test_strict_loading_errors(tmp_path, validator):
    validator.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "extra.weight": torch.zeros(2)}, str(weights))
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        FlowValidator.from_pretrained(tmp_path)
    state.pop("head.bias")
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"missing keys \['head.bias'\]"):
        FlowValidator.from_pretrained(tmp_path)


def test_shape_mismatch_and_missing_weights(tmp_path, validator):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["validator_config"]["hidden"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="was edited after it was saved"):
        FlowValidator.from_pretrained(tmp_path)
    del cfg["config_sha256"]  # as in files saved before the config hash: the weights' shapes still catch it
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="other shapes"):
        FlowValidator.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors is missing"):
        FlowValidator.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights_raise_clearly(tmp_path, validator, damage):
    validator.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        FlowValidator.from_pretrained(tmp_path)


def test_config_errors(tmp_path, validator):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "format_version": 7}))
    with pytest.raises(CheckpointError, match="Upgrade hf_flowcheck"):
        FlowValidator.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(CheckpointError, match="not an hf_flowcheck FlowValidator"):
        FlowValidator.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"No config.json"):
        FlowValidator.from_pretrained(tmp_path)


def _populate_cache(cache: Path, repo_id: str, source: Path) -> str:
    """Lay files out as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<rev>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in source.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return commit


def test_from_hub_id_via_offline_cache(tmp_path, validator, extracted, monkeypatch):
    validator.save_pretrained(tmp_path / "src")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # explicit cache_dir
    _populate_cache(tmp_path / "cache", "org/flow-validator", tmp_path / "src")
    a = FlowValidator.from_pretrained("org/flow-validator", cache_dir=tmp_path / "cache")
    assert torch.equal(a.score_features(extracted).scores, validator.score_features(extracted).scores)
    # default cache (HF_HUB_CACHE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "default"))
    commit = _populate_cache(tmp_path / "default", "org/other", tmp_path / "src")
    b = FlowValidator.from_pretrained("org/other")
    c = FlowValidator.from_pretrained("org/other", revision=commit)
    assert torch.equal(b.score_features(extracted).scores, c.score_features(extracted).scores)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE=1"):
        FlowValidator.from_pretrained("org/not-cached")


def test_push_to_hub_uploads_the_three_files(validator):
    uploaded: dict[str, object] = {}

    def fake_upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        uploaded["repo_id"] = repo_id
        uploaded["files"] = _files(folder)
        uploaded["config"] = json.loads((folder / "config.json").read_text())
        uploaded["card"] = (folder / "README.md").read_text()
        return "https://huggingface.co/user/flow-validator/commit/abc"

    with (
        mock.patch.object(HfApi, "create_repo", return_value=SimpleNamespace(repo_id="user/flow-validator")) as cr,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload_folder),
        mock.patch.object(HfApi, "create_commit", side_effect=AssertionError("no direct commit expected")),
    ):
        url = validator.push_to_hub("user/flow-validator")
    assert url.endswith("/abc")
    assert cr.call_args.kwargs["repo_id"] == "user/flow-validator"
    assert uploaded["repo_id"] == "user/flow-validator"
    assert {"config.json", "model.safetensors", "README.md"} <= uploaded["files"]
    assert uploaded["config"]["validator_config"] == validator.config.to_dict()
    assert "flowcheck train" in uploaded["card"]


# ------------------------------------------------------------------------------- fingerprints


def test_fingerprint_fields(llama):
    fp = model_fingerprint(llama, base_id="org/tiny", revision="abc")
    assert fp["model_type"] == "llama" and fp["num_blocks"] == 4
    assert fp["hidden_size"] == 32 and fp["vocab_size"] == 99
    assert len(fp["readout_sha256"]) == 64
    assert fp["base_id"] == "org/tiny" and fp["revision"] == "abc"
    assert json.loads(json.dumps(fp)) == fp
    check_fingerprint(fp, llama)  # same model passes
    again = make_tiny_model("llama")  # same seed, new storage: same hash
    assert model_fingerprint(again)["readout_sha256"] == fp["readout_sha256"]


def test_readout_hash_sees_in_place_edits():
    model = make_tiny_model("llama")
    w = model.get_output_embeddings().weight
    before = readout_sha256(w)
    with torch.no_grad():
        w[0, 0] += 1.0
    assert readout_sha256(w) != before
    bf16 = readout_sha256(w.detach().to(torch.bfloat16))
    assert len(bf16) == 64


def test_readout_hash_cache_survives_address_reuse():
    # A freed readout's address may be reused by the next model's readout: the cache must not hit.
    for seed in range(4):
        model = make_tiny_model("llama", seed=seed)
        w = model.get_output_embeddings().weight
        assert readout_sha256(w) == readout_sha256(w, cache=False)
        del model, w


def test_other_seed_names_readout_hash(tmp_path, validator):
    other = make_tiny_model("llama", seed=1)
    with pytest.raises(FingerprintMismatchError, match="readout_sha256 differs") as err:
        validator.check_compatible(other)
    assert "train a validator" in str(err.value)
    assert "num_blocks" not in str(err.value)
    validator.save_pretrained(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="readout_sha256"):
        FlowValidator.from_pretrained(tmp_path, base_model=other)


def test_fewer_layers_names_num_blocks(tmp_path, validator):
    shallow = make_tiny_model("llama", num_hidden_layers=2)
    validator.save_pretrained(tmp_path)
    loaded = FlowValidator.from_pretrained(tmp_path)
    with pytest.raises(FingerprintMismatchError, match=r"num_blocks differs \(trained on 4, got 2\)"):
        loaded.check_compatible(shallow)
    with pytest.raises(FingerprintMismatchError, match="model_type differs"):
        loaded.check_compatible(make_tiny_model("gpt2"))


def test_check_compatible_without_fingerprint():
    v = FlowValidator(ValidatorConfig(num_features=10, **SMALL))
    with pytest.raises(ValueError, match="no base-model fingerprint"):
        v.check_compatible(make_tiny_model("llama"))
    with pytest.raises(ValueError, match="Unknown fingerprint field"):
        check_fingerprint({}, make_tiny_model("llama"), fields=("colour",))


@pytest.mark.parametrize(
    "edit",
    [
        lambda c: c["flow_config"].update(window_length=c["flow_config"]["window_length"] + 1),
        lambda c: c.update(flow_config=None),
        lambda c: c["base_fingerprint"].popitem(),
        lambda c: c["validator_config"].update(format_version=c["validator_config"]["format_version"] - 1),
        lambda c: c["training_metadata"].update(recommended_threshold=0.01),
    ],
)
def test_any_edit_of_config_json_is_refused(tmp_path, validator, edit):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=1))
    with pytest.raises(CheckpointError, match="edited after it was saved"):
        FlowValidator.from_pretrained(tmp_path)


def test_reformatting_config_json_is_not_an_edit(tmp_path, validator):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # other whitespace and key order
    FlowValidator.from_pretrained(tmp_path)


@pytest.mark.parametrize("field, value", [("hidden", 2**31), ("members", 10**6), ("state_dim", 2**40)])
def test_absurd_sizes_are_refused_before_allocation(tmp_path, validator, field, value):
    validator.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["validator_config"][field] = value
    del cfg["config_sha256"]  # as a file saved before the config hash: the bound still holds
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=f"{field}="):
        FlowValidator.from_pretrained(tmp_path)


def test_a_file_of_the_wrong_shape_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    import safetensors

    from hf_flowcheck.detectors.checkpoint import load_safetensors_strict

    module = torch.nn.Linear(3, 2)
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(64, 64), "bias": torch.zeros(2)}, str(path))
    reads = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def __enter__(self):
            self.fh = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.fh.keys()

        def get_slice(self, k):
            return self.fh.get_slice(k)

        def get_tensor(self, k):
            reads.append(k)
            return self.fh.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    with pytest.raises(CheckpointError, match=r"weight: file \(64, 64\) vs model \(2, 3\)"):
        load_safetensors_strict(module, path)
    assert reads == []
    save_file({"weight": torch.ones(2, 3), "bias": torch.ones(2)}, str(path))
    load_safetensors_strict(module, path)  # the same path reads a right file, through the same wrapper
    assert sorted(reads) == ["bias", "weight"] and bool((module.weight == 1).all())
