"""The one Hub layer of every saved detector (flow validator, gradient detector, hidden-state probe,
fused detector).

:class:`SavedDetectorMixin` gives a detector ``save_pretrained`` (atomic: config, weights and model
card), ``from_pretrained`` (a folder or a Hub id, strict weights, an optional fingerprint check) and
``push_to_hub``. A detector supplies its config dict, its tensors and its model card text; the
pieces below (Hub-fetch errors that say what to do offline, the ``config.json`` checks, locating
``model.safetensors``, the strict weight load) are shared by all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.constants import CONFIG_NAME, SAFETENSORS_SINGLE_FILE
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from torch import nn

from hf_flowcheck.errors import CheckpointError
from hf_flowcheck.filelocks import path_lock
from hf_flowcheck.version import __version__

__all__ = [
    "AtomicSaveMixin",
    "CheckpointError",
    "SavedDetectorMixin",
    "atomic_save_dir",
    "check_checkpoint_config",
    "config_sha256",
    "file_sha256",
    "fingerprint_table",
    "hub_fetch_errors",
    "jsonable",
    "load_safetensors_strict",
    "weights_file",
]


def _artifact_kind(folder: Path, required: str) -> tuple[str, str] | None:
    """What hf_flowcheck artifact ``folder`` holds, read from its ``required`` JSON; ``None`` if none."""
    import json

    try:
        data = json.loads((folder / required).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("library") == "hf_flowcheck":
        return ("detector", str(data.get("model_class")))
    if "hf_flowcheck_version" in data:
        return ("file", required)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_leftovers(target: Path) -> None:
    """Remove what killed saves of ``target`` left beside it (their process is gone)."""
    import re
    import shutil

    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(saving|old)-(\d+)(-.*)?$")
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(entry, ignore_errors=True)


def atomic_save_dir(
    target: str | os.PathLike[str], write: Any, *, required: str = CONFIG_NAME, overwrite: bool = False
) -> Path:
    """Write a saved-artifact folder so that a failure leaves the old one untouched.

    ``write(tmp)`` fills a fresh temporary folder beside ``target``; only when it returns and the
    folder holds the JSON file ``required`` (``config.json``) does the old folder make way for the new one (files of the
    old folder that the save does not write are carried over). A failure inside ``write`` removes
    the temporary folder and re-raises: nothing at ``target`` changed.

    The destination is checked before anything is replaced: an existing, non-empty folder must hold
    an hf_flowcheck artifact of the same kind (same ``required`` file, same detector class), or only
    files the save does not write (kept). A folder whose files the save would replace and that is not
    such an artifact (a model folder) is refused, ``overwrite=True`` or not; ``overwrite=True`` lets an
    hf_flowcheck artifact of another kind be replaced. A symlink is
    followed (the link stays, its folder gets the artifact). Saves of one folder take turns (a file
    lock beside it), and what killed saves left behind is removed at the next save.

    Raises:
        FileExistsError: ``target`` is a file, or a folder this save must not replace.
    """
    import json
    import shutil
    import tempfile

    target = Path(os.path.realpath(Path(target).expanduser()))
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} is a file; save_pretrained() needs a folder path (a new or existing folder).")
    target.parent.mkdir(parents=True, exist_ok=True)
    with path_lock(target):
        _clean_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-{os.getpid()}-", dir=target.parent))
        try:
            write(tmp)
            json.loads((tmp / required).read_text(encoding="utf-8"))
            if target.exists() and any(target.iterdir()):
                _check_destination(target, tmp, required, overwrite)
            # mkdtemp makes 0700 folders (and some writers 0600 files); a saved artifact follows the umask.
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)
            for entry in tmp.iterdir():
                if entry.is_file():
                    os.chmod(entry, 0o666 & ~mask)
            old = None
            if target.exists():
                # Files the save does not write (a training checkpoint, an evaluation) stay in the folder.
                for entry in target.iterdir():
                    if not (tmp / entry.name).exists():
                        os.replace(entry, tmp / entry.name)
                old = target.parent / f".{target.name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _check_destination(target: Path, tmp: Path, required: str, overwrite: bool) -> None:
    old_kind, new_kind = _artifact_kind(target, required), _artifact_kind(tmp, required)
    if old_kind == new_kind:
        return
    what = f"an hf_flowcheck {old_kind[1]}" if old_kind else "files that are not an hf_flowcheck artifact"
    if old_kind is None:
        clashing = sorted(e.name for e in tmp.iterdir() if (target / e.name).exists())
        if clashing:  # files the save does not write are kept, so only a clash could lose data
            raise FileExistsError(
                f"{target} holds {what} ({', '.join(sorted(e.name for e in target.iterdir())[:5])}); saving there "
                f"would replace {', '.join(clashing)}. Save to a new or empty folder (overwrite=True never "
                "replaces files hf_flowcheck did not write)."
            )
        return
    if not overwrite:
        raise FileExistsError(
            f"{target} holds {what}, not a {new_kind[1]}; save to another folder, or pass overwrite=True to replace it."
        )


@contextmanager
def hub_fetch_errors(what: str, name: str) -> Iterator[None]:
    """Turn a Hub download failure into a :class:`CheckpointError` that says what to check.

    Args:
        what: The artifact, e.g. ``"validator"``.
        name: The folder or repo id asked for.
    """
    folder = Path(name)
    if (folder / CONFIG_NAME).is_file():  # read it first: the Hub mixin would raise a bare JSON or type error
        import json

        try:
            parsed = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"{folder / CONFIG_NAME} is not valid JSON ({err}); the {what} folder is damaged. Save it again "
                "with save_pretrained(), or fetch it again."
            ) from None
        if not isinstance(parsed, dict):
            raise CheckpointError(
                f"{folder / CONFIG_NAME} holds a JSON {type(parsed).__name__}, not an object; it is not a {what} "
                "config. Save the folder again with save_pretrained()."
            )
    try:
        yield
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError) as err:
        raise CheckpointError(
            f"Could not fetch the {what} {name!r}: {str(err).rstrip('.')}. Check the repo id / folder; when offline "
            "(HF_HUB_OFFLINE=1) the files must already be in the Hugging Face cache (download them once online, or "
            "pass a local folder)."
        ) from err


def check_checkpoint_config(
    config: Any, model_id: str, *, key: str, class_name: str, format_version: int
) -> dict[str, Any]:
    """Check that ``config`` (the parsed ``config.json``) is an hf_flowcheck checkpoint we can read.

    Args:
        config: The parsed ``config.json`` (``None`` when there was none).
        model_id: Folder or repo id, for messages.
        key: The entry that identifies the class's checkpoints (e.g. ``"validator_config"``).
        class_name: The class that writes such folders (for messages).
        format_version: Newest format this version of the class reads.

    Returns:
        ``config``.

    Raises:
        CheckpointError: No config, another library's config, or a newer format.
    """
    if not isinstance(config, dict):
        raise CheckpointError(
            f"No {CONFIG_NAME} found for {model_id!r}; a {class_name} folder holds {CONFIG_NAME} and "
            f"{SAFETENSORS_SINGLE_FILE} as written by {class_name}.save_pretrained()."
        )
    if config.get("library") != "hf_flowcheck" or key not in config:
        raise CheckpointError(
            f"{model_id!r} is not an hf_flowcheck {class_name} checkpoint (its {CONFIG_NAME} has no {key!r}); "
            f"load it with the library that wrote it, or save one with {class_name}.save_pretrained()."
        )
    fmt = config.get("format_version", format_version)
    if not isinstance(fmt, int) or fmt > format_version:
        raise CheckpointError(
            f"{model_id!r} was written in format_version {fmt!r} by hf_flowcheck "
            f"{config.get('hf_flowcheck_version')}; this hf_flowcheck ({__version__}) reads format {format_version}. "
            "Upgrade hf_flowcheck."
        )
    return config


def weights_file(
    model_id: str,
    *,
    what: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> str:
    """Path of ``model.safetensors`` in the folder ``model_id``, or downloaded from the Hub repo.

    Raises:
        CheckpointError: A local folder without the weights file.
    """
    if os.path.isdir(model_id):
        path = os.path.join(model_id, SAFETENSORS_SINGLE_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing; re-save the {what} with save_pretrained().")
        return path
    return hf_hub_download(
        repo_id=model_id,
        filename=SAFETENSORS_SINGLE_FILE,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        token=token,
        local_files_only=local_files_only,
    )


def load_safetensors_strict(
    module: nn.Module,
    path: str | Path,
    *,
    map_location: str = "cpu",
    strict: bool = True,
    what: str = "detector",
    error: type[Exception] = CheckpointError,
    defaults: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load ``model.safetensors`` into ``module``, refusing missing/unexpected keys, shapes and NaN.

    Args:
        module: The module to fill.
        path: The safetensors file.
        map_location: Device for the tensors.
        strict: Refuse missing or unexpected keys.
        what: Name of the artifact in messages.
        error: Exception class raised.
        defaults: Values for keys an older format did not write (used only when absent).
    """
    from safetensors import safe_open

    try:
        # Keys and shapes come from the header: a file of the wrong shape is refused before any
        # tensor is read (a hostile or mismatched file cannot make us allocate its tensors).
        with safe_open(str(path), framework="pt", device=str(map_location)) as fh:
            shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118
            own = module.state_dict()
            _check_keys_and_shapes(own, shapes, defaults, path, what, strict, error)
            state = {k: fh.get_tensor(k) for k in shapes if k in own}
    except error:
        raise
    except Exception as err:  # SafetensorError / OSError on bad files
        raise error(
            f"Could not read the {what} weights {str(path)!r}: {str(err).rstrip('.')}. The file is corrupted or "
            "truncated (e.g. an interrupted download or copy); re-download it (force_download=True) or save the "
            f"{what} again."
        ) from err
    for key, value in (defaults or {}).items():
        state.setdefault(key, value)
    bad = [
        k
        for k in sorted(set(own) & set(state))
        if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all())
    ]
    if bad:
        raise error(f"The weights in {str(path)!r} hold NaN/inf in {bad}; the checkpoint is broken.")
    module.load_state_dict(state, strict=strict)


def _check_keys_and_shapes(
    own: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    defaults: Mapping[str, torch.Tensor] | None,
    path: str | Path,
    what: str,
    strict: bool,
    error: type[Exception],
) -> None:
    """Refuse a file whose keys (less ``defaults``) or shapes differ from the module's."""
    have = set(shapes) | set(defaults or {})
    missing, unexpected = sorted(set(own) - have), sorted(set(shapes) - set(own))
    if strict and (missing or unexpected):
        raise error(
            f"The weights in {str(path)!r} do not match this {what}: missing keys {missing}, unexpected keys "
            f"{unexpected}. config.json and model.safetensors come from different checkpoints (or another "
            "library); save them together with save_pretrained(). Pass strict=False only to load a partial state."
        )
    wrong = [
        f"{k}: file {shapes[k]} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(shapes))
        if shapes[k] != tuple(own[k].shape)
    ]
    if wrong:
        raise error(
            f"The weights in {str(path)!r} have other shapes than config.json describes ({'; '.join(wrong)}); "
            "config.json and model.safetensors come from different checkpoints."
        )


def jsonable(obj: Any, where: str) -> Any:
    """Copy of ``obj`` with NaN/inf floats as ``None`` and tuples as lists; raises on other types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalars
        return jsonable(obj.item(), where)
    raise ValueError(
        f"{where} holds a {type(obj).__name__}, which cannot be written to config.json; "
        "store plain numbers, strings, lists and dicts (e.g. evaluate_scores() results)."
    )


class AtomicSaveMixin:
    """``save_pretrained`` through :func:`atomic_save_dir`; put it before ``PyTorchModelHubMixin`` in the bases."""

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> Any:
        """Save config, weights and model card atomically: a failure leaves an existing folder as it was.

        Takes ``PyTorchModelHubMixin.save_pretrained``'s arguments (``push_to_hub=True`` pushes
        after the local save) and ``overwrite`` (see :func:`atomic_save_dir`: a folder holding anything
        but a detector of this class is refused unless ``overwrite=True``; foreign files never go).
        """
        push = kwargs.pop("push_to_hub", False)
        repo_id = kwargs.pop("repo_id", None)
        overwrite = kwargs.pop("overwrite", False)
        atomic_save_dir(
            save_directory,
            lambda tmp: super(AtomicSaveMixin, self).save_pretrained(tmp, **kwargs),
            overwrite=overwrite,
        )
        if push:
            return self.push_to_hub(repo_id or Path(save_directory).name, **kwargs)
        return None


def config_sha256(config: Mapping[str, Any]) -> str:
    """sha256 of a ``config.json`` dict's canonical JSON, the ``config_sha256`` entry itself left out."""
    import hashlib
    import json

    body = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_front_matter(tags: Sequence[str], *, base_model: str | None = None) -> list[str]:
    """The YAML block every hf_flowcheck model card opens with (``library_name``, ``tags``, ``base_model``).

    Args:
        tags: The card's tags, in order.
        base_model: A Hub id to record as ``base_model`` (written as a JSON string, a valid YAML scalar).

    Returns:
        The lines, ending with the closing ``---`` and a blank line.
    """
    lines = ["---", "library_name: hf_flowcheck", "tags:", *(f"- {t}" for t in tags)]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    return [*lines, "---", ""]


def fingerprint_table(fp: Mapping[str, Any] | None) -> list[str]:
    """Model-card lines: the base-model fingerprint as a Markdown table (or "Not recorded.")."""
    if not fp:
        return ["Not recorded."]
    return ["| field | value |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in fp.items()]


class SavedDetectorMixin(AtomicSaveMixin):
    """Save, load and push a detector as ``config.json`` + ``model.safetensors`` + ``README.md``.

    Put it first among the Hub bases (``class D(nn.Module, SavedDetectorMixin, PyTorchModelHubMixin)``,
    or ``ModelHubMixin`` for a detector that is not an ``nn.Module``). A subclass sets
    ``FORMAT_VERSION``, ``CONFIG_KEY`` (the ``config.json`` entry that marks its checkpoints) and
    ``WHAT`` (its name in messages), and implements :meth:`config_dict`, :meth:`from_config_dict` and
    :meth:`model_card_text`; :meth:`state_tensors` and :meth:`load_state_tensors` default to the
    module's ``state_dict``.
    """

    FORMAT_VERSION: int = 1
    CONFIG_KEY: str = ""
    WHAT: str = "detector"

    # ------------------------------------------------------------------ what a subclass supplies
    def config_dict(self) -> dict[str, Any]:
        """The class's own ``config.json`` entries (JSON-ready; must include ``CONFIG_KEY``)."""
        raise NotImplementedError

    @classmethod
    def from_config_dict(cls, config: dict[str, Any], **model_kwargs: Any) -> Any:
        """An instance (weights not loaded yet) from a checked ``config.json``; ``ValueError`` if invalid."""
        raise NotImplementedError

    def model_card_text(self) -> str:
        """Markdown of the model card (works offline)."""
        raise NotImplementedError

    def check_saveable(self) -> None:
        """Raise before anything is written when the detector cannot be saved (e.g. not fitted)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors written to ``model.safetensors``."""
        return dict(self.state_dict())  # type: ignore[attr-defined]

    def load_state_tensors(self, path: str, *, map_location: str = "cpu", strict: bool = True) -> None:
        """Read ``model.safetensors`` strictly into this instance."""
        load_safetensors_strict(self, path, map_location=map_location, strict=strict, what=self.WHAT)  # type: ignore[arg-type]

    # ----------------------------------------------------------------------------- shared I/O
    def to_config_dict(self) -> dict[str, Any]:
        """The content of ``config.json``: library and format stamps plus :meth:`config_dict`."""
        return {
            "library": "hf_flowcheck",
            "model_class": type(self).__name__,
            "format_version": self.FORMAT_VERSION,
            "hf_flowcheck_version": __version__,
            **self.config_dict(),
        }

    def _save_pretrained(self, save_directory: Path) -> None:
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` (called by ``save_pretrained``)."""
        import json

        from safetensors.torch import save_file

        self.check_saveable()
        save_directory = Path(save_directory)
        config = self.to_config_dict()  # raises before anything is written if metadata is not JSON
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.state_tensors().items()}
        meta = {"format": "pt", "hf_flowcheck_version": __version__, "format_version": str(self.FORMAT_VERSION)}
        save_file(state, str(save_directory / SAFETENSORS_SINGLE_FILE), metadata=meta)
        # The weights' hash ties config and weights together: a folder mixed from two saves is refused.
        config["weights_sha256"] = file_sha256(save_directory / SAFETENSORS_SINGLE_FILE)
        # And every entry of config.json is bound to the rest: an edited field is refused on load.
        config["config_sha256"] = config_sha256(config)
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, sort_keys=True, indent=2), encoding="utf-8")
        (save_directory / "README.md").write_text(self.model_card_text(), encoding="utf-8")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> Any:
        from huggingface_hub import ModelCard

        return ModelCard(self.model_card_text())

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        base_model: nn.Module | None = None,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Load from a folder written by ``save_pretrained`` or a Hub id (the Hub cache is used offline).

        Args:
            pretrained_model_name_or_path: Folder, or a Hub repo id such as ``"org/name"``.
            base_model: When given, ``check_compatible(base_model)`` runs after loading.
            map_location: Device for the weights.
            strict: Refuse missing or unexpected weight keys (default ``True``).
            **kwargs: ``revision``, ``cache_dir``, ``force_download``, ``token``, ``local_files_only``.

        Raises:
            CheckpointError: Missing, corrupted, truncated or mismatched files.
            FingerprintMismatchError: ``base_model`` is not the model it was trained on.
        """
        from hf_flowcheck.offline_models import local_or_hub

        path = local_or_hub(pretrained_model_name_or_path, cls.WHAT)
        with hub_fetch_errors(cls.WHAT, str(path)):
            det = super().from_pretrained(path, map_location=str(map_location), strict=strict, **kwargs)  # type: ignore[misc]
        if base_model is not None:
            det.check_compatible(base_model)
        return det

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict | None = None,
        **model_kwargs: Any,
    ) -> Any:
        config = check_checkpoint_config(
            config, model_id, key=cls.CONFIG_KEY, class_name=cls.__name__, format_version=cls.FORMAT_VERSION
        )
        recorded_config = config.get("config_sha256")
        if recorded_config is not None and config_sha256(config) != recorded_config:
            raise CheckpointError(
                f"The {CONFIG_NAME} of {model_id!r} was edited after it was saved (config_sha256 differs); an edited "
                "flow config, fingerprint or size would score silently wrong. Re-save the detector with "
                "save_pretrained(), or change it through its API and save again."
            )
        try:
            det = cls.from_config_dict(config, **model_kwargs)
        except ValueError as err:
            raise CheckpointError(f"The {CONFIG_NAME} of {model_id!r} is invalid: {err}") from err
        weights = weights_file(
            model_id,
            what=cls.WHAT,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            token=token,
            local_files_only=local_files_only,
        )
        # Structural checks first (their messages say what is wrong), then the file's identity.
        det.load_state_tensors(weights, map_location=map_location, strict=strict)
        recorded = config.get("weights_sha256")
        if recorded is not None and file_sha256(weights) != recorded:
            raise CheckpointError(
                f"The {SAFETENSORS_SINGLE_FILE} of {model_id!r} is not the one its {CONFIG_NAME} was saved with "
                "(sha256 differs): the folder was altered or mixed from two saves. Re-save the detector with "
                "save_pretrained()."
            )
        return det.eval() if hasattr(det, "eval") else det
