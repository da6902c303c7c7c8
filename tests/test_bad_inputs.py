"""Hostile inputs at the command line and at the loaders: one clear line, exit status 2, no traceback."""

from __future__ import annotations

import pytest

from hf_flowcheck.cli import main


def run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "q?", "--model", "./no/such/model"], "no such folder"),
        (["generate", "q?", "--model", "~/no-such-model-dir"], "no such folder"),
        (["generate", "q?", "--max-new-tokens", "0"], "pass an integer >= 1"),
        (["generate", "q?", "--threshold", "7"], "outside [0, 1]"),
        (["generate", "q?", "--threshold", "high"], "not a number"),
        (["extract", "--dataset", "halueval-qa", "--out", "x", "--dtype", "bogus"], "invalid choice"),
        (["answers", "--out", "x.jsonl", "--batch-size", "0"], "pass an integer >= 1"),
        (["answers", "--out", "x.jsonl", "--dataset", "trivia"], "invalid choice"),
        (["train", "--features", "./no-such-store", "--out", "v"], "no-such-store"),
        (["evaluate", "--validator", "./no/such/validator", "--features", "x"], "no such"),
    ],
)
def test_cli_refuses_with_one_line(argv, needle, capsys):
    code, err = run(argv, capsys)
    assert code == 2
    assert needle in err


def test_validator_folder_typo_is_named(tmp_path):
    from hf_flowcheck.modeling import _load_validator

    with pytest.raises(FileNotFoundError, match=r"validator '\./no/such/v': no such folder"):
        _load_validator("./no/such/v")


def test_validator_without_fingerprint_is_refused():
    import torch
    from conftest import make_tiny_model

    from hf_flowcheck import FlowCheckedModelForCausalLM
    from hf_flowcheck.detectors import FlowValidator, ValidatorConfig

    model = make_tiny_model("llama")
    v = FlowValidator(ValidatorConfig(num_features=10, hidden=8, embed=4, gru_hidden=4))
    with pytest.raises(ValueError, match="check_compatibility=False"):
        FlowCheckedModelForCausalLM(model, v)
    fc = FlowCheckedModelForCausalLM(model, v, check_compatibility=False)  # the explicit opt-out
    assert fc.validator is v and torch.is_tensor(v.feature_shift)
