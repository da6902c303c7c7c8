"""TrainConfig: one owner for the training recipe (defaults, bounds, help), shared by the CLI and the API."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from hf_flowcheck.cli.research import add_train_arguments
from hf_flowcheck.detectors.flow_validator import ValidatorConfig
from hf_flowcheck.workflows.experiments import train_from_store
from hf_flowcheck.workflows.train_config import TrainConfig


def _cli(*argv: str) -> TrainConfig:
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    args = p.parse_args(["--features", "f", "--out", "o", *argv])
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def test_cli_defaults_are_the_configs_and_the_validators():
    assert _cli() == TrainConfig()
    shape = {f.name: f.default for f in dataclasses.fields(ValidatorConfig)}
    for name in ("head", "pooling", "input_transform", "event_layernorm", "hidden", "embed", "gru_hidden", "dropout"):
        assert getattr(TrainConfig(), name) == shape[name], name


def test_cli_flags_reach_the_config():
    got = _cli("--head", "attention", "--no-event-layernorm", "--state", "--state-init", "frozen-probe",
               "--channels", "a", "b", "--bootstrap", "7", "--lr", "0.01")  # fmt: skip
    assert got == TrainConfig(head="attention", event_layernorm=False, state=True, state_init="frozen-probe",
                              channels=("a", "b"), n_bootstrap=7, lr=0.01)  # fmt: skip


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
    ],
)
def test_bad_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**bad)


def test_unknown_option_of_train_from_store_is_named_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown training option\(s\) \['heads'\]"):
        train_from_store(tmp_path / "no-store", tmp_path / "out", heads="attention")
    assert not (tmp_path / "out").exists()
