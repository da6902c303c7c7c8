"""Options every ``flowcheck`` command shares, their argparse types, and the one error policy."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from hf_flowcheck.configuration import parse_positive_int
from hf_flowcheck.errors import FeatureStoreError, GradientSignatureError

__all__ = [
    "DTYPES",
    "THRESHOLD_HELP",
    "USER_ERRORS",
    "add_config_flags",
    "add_model_options",
    "config_from_flags",
    "load_model_from_args",
    "model_load_kwargs",
    "positive_int",
    "unit_interval",
]

DTYPES = ("float32", "bfloat16", "float16")

#: What the command line answers with a one-line message and exit status 2 (no traceback): bad
#: values, missing or clashing files, and the library's own store and gradient errors.
USER_ERRORS = (ValueError, OSError, FeatureStoreError, GradientSignatureError)

THRESHOLD_HELP = (
    "Score above which the answer is called likely hallucinated, in [0, 1] (default 0.5, the balanced point of a "
    "class-weighted validator; its model card lists thresholds chosen on validation)."
)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with a message that names the allowed values."""
    return _argparse_type(parse_positive_int)(text)


def unit_interval(text: str) -> float:
    """argparse type: a number in ``[0, 1]`` (a threshold on a probability)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a threshold in [0, 1].") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1]; pass a threshold in [0, 1].")
    return value


def add_model_options(
    parser: argparse.ArgumentParser,
    *,
    help: str = "Offline model name, local folder or Hub id.",
    dtype: str | None = None,
) -> argparse.ArgumentParser:
    """``--model``, ``--dtype`` and ``--device-map``, declared once for every command that loads a model.

    Args:
        parser: A subcommand parser.
        help: Help text of ``--model``.
        dtype: Default of ``--dtype`` (``None``: the checkpoint's own, float32 for the offline models).
    """
    from hf_flowcheck.offline_models import DEFAULT_MODEL

    parser.add_argument("--model", default=DEFAULT_MODEL, help=help)
    parser.add_argument("--dtype", choices=DTYPES, default=dtype, help=f"Model dtype (default: {dtype or 'float32'}).")
    parser.add_argument("--device-map", default=None, help="Passed to from_pretrained (e.g. auto or cuda).")
    return parser


def model_load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of the model options."""
    import torch

    kwargs: dict[str, Any] = {}
    if getattr(args, "dtype", None):
        kwargs["dtype"] = getattr(torch, args.dtype)
    if getattr(args, "device_map", None):
        kwargs["device_map"] = args.device_map
    return kwargs


def load_model_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model`` with ``--dtype`` and ``--device-map``: the one loader of the CLI."""
    from hf_flowcheck.offline_models import load_model

    return load_model(args.model, **model_load_kwargs(args))


def add_config_flags(
    group: Any,
    cls: type,
    *,
    dest_prefix: str = "",
    flag_prefix: str = "",
    flag_names: dict[str, str] | None = None,
    exclude: tuple[str, ...] = (),
) -> None:
    """One flag per field of the config dataclass ``cls``, from its field metadata (one owner for each
    option's default, choices and help).

    A flag the user does not give sets nothing (``argparse.SUPPRESS``), so :func:`config_from_flags`
    passes only what the user set and the dataclass keeps its own defaults — also where ``None`` is a
    meaningful value. Booleans get a ``--flag`` / ``--no-flag`` pair (``type=bool`` would read ``False``
    as true); a field with ``metadata["nargs"]`` takes a list; ``metadata["parse"]`` is the field's own
    parser of its command-line text (a ``ValueError`` becomes argparse's usage error).

    Args:
        group: A parser or argument group.
        cls: The config dataclass.
        dest_prefix: Prefix of each ``args`` attribute (two configs in one command do not clash).
        flag_prefix: Prefix of each flag after ``--`` (``"gradient-"`` gives ``--gradient-sketch``).
        flag_names: Explicit flags for some fields.
        exclude: Fields that get no flag (the command sets them from another option).
    """
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = (flag_names or {}).get(f.name, "--" + flag_prefix + f.name.replace("_", "-"))
        has_default = f.default is not dataclasses.MISSING
        shown = "exact" if f.default is None and "parse" in f.metadata else f.default
        text = f.metadata.get("help", "").replace("%", "%%") + (f" (default: {shown!r})" if has_default else "")
        common = {"dest": dest_prefix + f.name, "default": argparse.SUPPRESS, "help": text}
        if isinstance(f.default, bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif "nargs" in f.metadata:
            group.add_argument(flag, nargs=f.metadata["nargs"], **common)
        else:
            kind = f.metadata.get("parse") or (type(f.default) if has_default and f.default is not None else str)
            group.add_argument(flag, type=_argparse_type(kind), choices=f.metadata.get("choices"), **common)


def _argparse_type(parse: Any) -> Any:
    """``parse`` with its ``ValueError`` message kept in argparse's usage error (argparse drops it otherwise)."""
    if parse in (int, float, str):
        return parse

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def config_from_flags(args: argparse.Namespace, cls: type, *, dest_prefix: str = "", **fixed: Any) -> Any:
    """The ``cls`` config of the flags :func:`add_config_flags` added: the given ones, then ``fixed``."""
    given = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, dest_prefix + f.name):
            given[f.name] = getattr(args, dest_prefix + f.name)
    return cls(**{**given, **fixed})
