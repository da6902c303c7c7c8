"""`flowcheck train` / `flowcheck evaluate` on a small paired store from a tiny model."""

import json

import pytest
from conftest import make_tiny_model, tiny_flow_config
from test_workflows_extract import CharTokenizer

from hf_flowcheck.cli import main
from hf_flowcheck.data import LabeledExample
from hf_flowcheck.detectors.flow_validator import FlowValidator
from hf_flowcheck.workflows import extract as pl
from hf_flowcheck.workflows.experiments import train_from_store
from hf_flowcheck.workflows.train_config import TrainConfig


def _pairs(n):
    out = []
    for i in range(n):
        prompt = f"Q{i}: who wrote it?\nAnswer:"
        out.append(LabeledExample(f"r:{i}", "qa", prompt, "Ann Lee", 0, "right"))
        out.append(LabeledExample(f"r:{i}", "qa", prompt, f"It was written by somebody else {i}.", 1, "hallucinated"))
    return out


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    pl.extract_dataset(
        make_tiny_model("llama"),
        CharTokenizer(),
        _pairs(40),
        out,
        config=tiny_flow_config(),
        protocol="paired",
        batch_size=8,
        shard_size=32,
        progress=False,
    )
    return out


def test_train_then_evaluate_cli(store_dir, tmp_path, capsys):
    out = tmp_path / "validator"
    _, report = train_from_store(
        store_dir, out, epochs=4, batch_size=8, n_bootstrap=50, progress=False, command="flowcheck train ..."
    )
    split = report["split"]
    assert split["train"] + split["validation"] + split["test"] == 80 and split["test"] > 0
    assert (out / "README.md").read_text().count("flowcheck train ...") >= 1
    assert {"flow validator", "length-only (answer words)"} <= set(report["rows"])
    assert report["length_matched_pairs"] == 0  # the answers differ in length by construction
    v = FlowValidator.from_pretrained(str(out))
    assert v.flow_config == tiny_flow_config()
    recorded = TrainConfig.from_dict(v.training_metadata["train_config"])  # the run can be repeated from it
    assert recorded == TrainConfig(epochs=4, batch_size=8, n_bootstrap=50)
    rc = main(
        [
            "evaluate",
            "--validator",
            str(out),
            "--features",
            str(store_dir),
            "--bootstrap",
            "50",
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "auroc" in printed.lower() and "length-only" in printed
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["n"] == split["test"]
    assert saved["rows"]["flow validator"]["metrics"]["auroc"]["value"] == pytest.approx(
        report["rows"]["flow validator"]["metrics"]["auroc"]["value"]
    )


def test_evaluate_bad_paths_give_clear_errors(tmp_path, capsys):
    rc = main(["evaluate", "--validator", str(tmp_path / "nope"), "--features", str(tmp_path)])
    assert rc == 2
    assert "error" in capsys.readouterr().err


def test_train_cli_passes_validator_options(store_dir, tmp_path, capsys):
    out = tmp_path / "v-options"
    argv = ["train", "--features", str(store_dir), "--out", str(out), "--epochs", "1", "--bootstrap", "20"]
    argv += ["--no-event-layernorm", "--input-transform", "standardize", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    cfg = FlowValidator.from_pretrained(str(out)).config
    assert cfg.event_layernorm is False and cfg.input_transform == "standardize"


def test_drop_uids_keeps_every_other_record_in_its_split(store_dir, tmp_path):
    from hf_flowcheck.data.splits import split_records
    from hf_flowcheck.workflows.store import FeatureStore

    _, _, uids = FeatureStore.open(store_dir).load()
    full = split_records(uids, seed=0)
    drop = set(full.test[:2]) | set(full.train[:1])
    _, report = train_from_store(
        store_dir, tmp_path / "v", epochs=1, batch_size=8, n_bootstrap=10, progress=False, drop_uids=drop
    )
    per_uid = 2  # the fixture store is paired: two answers per record
    assert report["split"]["test"] == per_uid * (len(full.test) - 2)
    assert report["split"]["train"] == per_uid * (len(full.train) - 1)
    assert report["split"]["validation"] == per_uid * len(full.validation)


def test_evaluate_refuses_another_models_or_configs_store(store_dir, tmp_path, capsys):
    out = tmp_path / "validator"
    train_from_store(store_dir, out, epochs=1, batch_size=8, n_bootstrap=20, progress=False)
    other_model = tmp_path / "other-model"
    other_cfg = tmp_path / "other-config"
    for folder, model, cfg in (
        (other_model, make_tiny_model("llama", seed=3), tiny_flow_config()),
        (other_cfg, make_tiny_model("llama"), tiny_flow_config(subspace_dim=3)),
    ):
        pl.extract_dataset(model, CharTokenizer(), _pairs(12), folder, config=cfg, protocol="paired", batch_size=8,
                           shard_size=32, progress=False)  # fmt: skip
    assert main(["evaluate", "--validator", str(out), "--features", str(other_model)]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["evaluate", "--validator", str(out), "--features", str(other_cfg)]) == 2
    assert "subspace_dim: validator 4, store 3" in capsys.readouterr().err


def test_train_refuses_too_few_of_a_class(tmp_path, capsys):
    few = tmp_path / "few"
    pl.extract_dataset(make_tiny_model("llama"), CharTokenizer(), _pairs(12), few, config=tiny_flow_config(),
                       protocol="paired", batch_size=8, shard_size=32, progress=False)  # fmt: skip
    assert main(["train", "--features", str(few), "--out", str(tmp_path / "v"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 20 of each" in err and "correct and" in err


def test_flowcheck_train_builds_the_flow_plus_token_confidence_design(tmp_path):
    """The shipped corpus design from the command line's path: a token-confidence store, --state, frozen probe."""
    store = tmp_path / "store"
    pl.extract_dataset(make_tiny_model("llama"), CharTokenizer(), _pairs(40), store,
                       config=tiny_flow_config(state_summary="token_confidence"), protocol="paired", batch_size=8,
                       shard_size=32, progress=False)  # fmt: skip
    v, _ = train_from_store(store, tmp_path / "v", epochs=2, batch_size=8, n_bootstrap=20, progress=False,
                            head="attention", state=True, state_init="frozen-probe")  # fmt: skip
    assert v.flow_config.state_summary == "token_confidence"
    assert (v.config.state_dim, v.config.state_blocks) == (3, (0,))
    loaded = FlowValidator.from_pretrained(str(tmp_path / "v"))  # and it loads back as the same design
    assert loaded.flow_config == v.flow_config and loaded.config == v.config
