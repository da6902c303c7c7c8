"""Saves never destroy what they do not own: foreign folders, symlinks, killed saves, two writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_model, tiny_validator

from hf_flowcheck import FlowCheckedModelForCausalLM
from hf_flowcheck.detectors.checkpoint import atomic_save_dir
from hf_flowcheck.detectors.flow_validator import FlowValidator


@pytest.fixture(scope="module")
def validator():
    return tiny_validator(make_tiny_model("llama"))


def _model_folder(path):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (path / "model.safetensors").write_bytes(b"not ours")
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_a_model_folder_is_refused_and_left_as_it_was(validator, tmp_path):
    folder = tmp_path / "model"
    before = _model_folder(folder)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not an hf_flowcheck artifact"):
            validator.save_pretrained(folder, overwrite=overwrite)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left
    # the wrapper writes flow_config.json and validator/ only: beside the model's files, which stay
    fc = FlowCheckedModelForCausalLM(make_tiny_model("llama"), validator)
    fc.save_pretrained(folder)
    assert all((folder / name).read_bytes() == data for name, data in before.items())
    assert (folder / "flow_config.json").is_file() and (folder / "validator" / "config.json").is_file()


def test_foreign_files_without_a_clash_stay(validator, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    validator.save_pretrained(folder)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "config.json").is_file()


def test_another_detector_kind_needs_overwrite(validator, tmp_path):
    folder = tmp_path / "v"
    validator.save_pretrained(folder)
    validator.save_pretrained(folder)  # the same kind: replaced in place
    fc = FlowCheckedModelForCausalLM(make_tiny_model("llama"), validator)
    fc.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "config.json").write_text(json.dumps({"hf_flowcheck_version": "0", "what": "other"}))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        validator.save_pretrained(tmp_path / "w")  # another hf_flowcheck artifact
    validator.save_pretrained(tmp_path / "w", overwrite=True)
    assert (tmp_path / "w" / "flow_config.json").is_file()  # what the validator does not write stays
    assert FlowValidator.from_pretrained(folder) is not None


def test_a_symlink_is_followed_and_kept(validator, tmp_path):
    real = tmp_path / "v3"
    validator.save_pretrained(real)
    (real / "evaluation.json").write_text("{}")
    link = tmp_path / "current"
    link.symlink_to(real, target_is_directory=True)
    validator.save_pretrained(link)
    assert link.is_symlink() and os.path.realpath(link) == str(real)
    assert (real / "evaluation.json").is_file() and (real / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["current", "v3"]


def test_leftovers_of_killed_saves_are_removed(validator, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".v.saving-{pid}-abc").mkdir()
    (tmp_path / f".v.old-{pid}").mkdir()
    alive = tmp_path / f".v.saving-{os.getppid()}-xyz"  # a save still running elsewhere is left alone
    alive.mkdir()
    validator.save_pretrained(tmp_path / "v")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".v."))
    assert left == [alive.name]


def test_failed_write_changes_nothing(tmp_path):
    folder = tmp_path / "a"
    atomic_save_dir(folder, lambda t: (t / "config.json").write_text(json.dumps({"hf_flowcheck_version": "x"})))

    def boom(t):
        (t / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_save_dir(folder, boom)
    assert json.loads((folder / "config.json").read_text()) == {"hf_flowcheck_version": "x"}


@pytest.mark.parametrize("content", ["{not json", "[1]", '{"window_length": "eight"}', "\xff"])
def test_a_damaged_flow_config_json_is_named(validator, tmp_path, content):
    from hf_flowcheck.errors import CheckpointError

    fc = FlowCheckedModelForCausalLM(make_tiny_model("llama"), validator)
    fc.save_pretrained(tmp_path / "w")
    (tmp_path / "w" / "flow_config.json").write_bytes(content.encode("latin-1"))
    from hf_flowcheck.modeling import _load_validator

    with pytest.raises(CheckpointError, match=r"flow_config\.json is not a valid flow config"):
        _load_validator(str(tmp_path / "w"))
