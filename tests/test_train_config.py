"""TrainConfig: one owner for the training recipe (defaults, bounds, help), shared by the CLI and the API."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hf_flowcheck.cli.options import config_from_flags
from hf_flowcheck.cli.research import add_train_arguments
from hf_flowcheck.detectors.flow_validator import ValidatorConfig
from hf_flowcheck.workflows.experiments import train_from_store
from hf_flowcheck.workflows.train_config import TrainConfig


def _cli(*argv: str) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--features", "f", "--out", "o", *argv])
    return config_from_flags(args, TrainConfig)


def test_cli_defaults_are_the_configs_and_the_validators():
    assert _cli() == TrainConfig()
    shape = {f.name: f.default for f in dataclasses.fields(ValidatorConfig)}
    for name in ("head", "pooling", "input_transform", "event_layernorm", "hidden", "embed", "gru_hidden", "dropout"):
        assert getattr(TrainConfig(), name) == shape[name], name


def test_cli_flags_reach_the_config():
    got = _cli("--head", "attention", "--no-event-layernorm", "--state", "--state-init", "frozen-probe",
               "--channels", "a", "b", "--bootstrap", "7", "--lr", "0.01",
               "--token-label-rule", "references+question")  # fmt: skip
    assert got == TrainConfig(head="attention", event_layernorm=False, state=True, state_init="frozen-probe",
                              channels=("a", "b"), n_bootstrap=7, lr=0.01,
                              token_label_rule="references+question")  # fmt: skip


def test_round_trip_and_version_stamps():
    cfg = TrainConfig(head="depth", members=3, channels=["x"])
    d = cfg.to_dict()
    assert d["format_version"] == TrainConfig.FORMAT_VERSION and d["hf_flowcheck_version"]
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="newer"):
        TrainConfig.from_dict({**d, "format_version": TrainConfig.FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match="Unknown TrainConfig field"):
        TrainConfig.from_dict({**d, "heads": "gru"})


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"lr": -1.0}, "lr"),
        ({"dropout": 1.0}, "dropout"),
        ({"head": "transformer"}, "head"),
        ({"selection": "test_auroc"}, "selection"),
        ({"state": "yes"}, "state"),
        ({"channels": "lens_top1"}, "channels"),
        ({"seed": -1}, "seed"),
        ({"state": True, "prefix_augment": 0.5}, "prefix_augment"),
        ({"members": 10**9}, "members"),
        ({"token_label_rule": "question"}, "token_label_rule='question' is not supported"),
        ({"grad_clip": 0}, "grad_clip=0 must be a positive number or None"),
    ],
)
def test_bad_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_option_of_train_from_store_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown TrainConfig option\(s\) \[.heads.\]"):
        train_from_store(tmp_path / "no-store", tmp_path / "out", heads="attention")
    assert not (tmp_path / "out").exists()


def test_extract_flags_are_the_extract_and_flow_configs():
    from hf_flowcheck.cli.research import add_extract_arguments
    from hf_flowcheck.configuration import FlowConfig
    from hf_flowcheck.workflows.extract_config import ExtractConfig

    p = add_extract_arguments(argparse.ArgumentParser())
    base = ["--dataset", "halueval-qa", "--out", "o"]
    args = p.parse_args(base)
    assert config_from_flags(args, ExtractConfig, dest_prefix="run_", protocol="paired") == ExtractConfig("paired")
    assert config_from_flags(args, FlowConfig, dest_prefix="flow_") == FlowConfig()
    args = p.parse_args([*base, "--protocol", "natural", "--batch-size", "3", "--no-resume", "--no-lens-features",
                         "--center", "mean", "--basis-solver", "subspace"])  # fmt: skip
    run = config_from_flags(args, ExtractConfig, dest_prefix="run_")
    assert run == ExtractConfig("natural", batch_size=3, resume=False)
    assert config_from_flags(args, FlowConfig, dest_prefix="flow_") == FlowConfig(
        center="mean", basis_solver="subspace"
    )
    for bad in (["--protocol", "sampled"], ["--center", "median"], ["--state-summary", "first"]):
        with pytest.raises(SystemExit):  # argparse names the choices from the config's own field metadata
            p.parse_args([*base, *bad])


def test_extract_config_options_and_errors():
    from hf_flowcheck.workflows.extract_config import ExtractConfig

    base = ExtractConfig("paired", batch_size=4)
    assert ExtractConfig.with_options(base, {"shard_size": 9}) == ExtractConfig("paired", batch_size=4, shard_size=9)
    assert ExtractConfig.with_options(None, {"protocol": "generated"}).max_new_tokens == 32
    with pytest.raises(ValueError, match=r"Unknown ExtractConfig option\(s\) \['batchsize'\]"):
        ExtractConfig.with_options(base, {"batchsize": 2})
    with pytest.raises(TypeError, match="Expected a config of type ExtractConfig, got TrainConfig"):
        ExtractConfig.with_options(TrainConfig(), {})
    with pytest.raises(ValueError, match=r"ExtractConfig\.resume='no' must be True or False"):
        ExtractConfig("paired", resume="no")
    assert ExtractConfig.from_dict(base.to_dict()) == base


def test_device_is_a_training_option_not_a_recipe_flag():
    import torch

    assert TrainConfig(device=torch.device("cpu")).device == "cpu"  # JSON-able
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="")
    assert TrainConfig.with_options(None, {"device": "cuda"}).device == "cuda"
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--features", "f", "--out", "o", "--device", "cuda"])
    assert config_from_flags(args, TrainConfig).device == "cuda"  # the CLI keeps its own --device flag
