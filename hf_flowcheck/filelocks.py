"""Writers of one file or folder take turns: a lock per path, kept outside the user's folders.

Saves of a detector folder wait for each other (:func:`path_lock`); long-running appenders (an
answers file, a feature store) refuse a second writer at once and name the process that holds the
file (:func:`exclusive_writer`), since waiting hours for a generation run is never what was meant.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from hf_flowcheck.errors import WriterBusyError

__all__ = ["WriterBusyError", "exclusive_writer", "path_lock", "path_lock_file"]


def path_lock_file(path: str | os.PathLike[str]) -> Path:
    """The lock file of ``path`` (by its real path), in ``<tmp>/hf_flowcheck-locks``, not beside it."""
    key = hashlib.sha256(os.path.realpath(os.fspath(path)).encode()).hexdigest()[:24]
    folder = Path(tempfile.gettempdir()) / "hf_flowcheck-locks"
    folder.mkdir(exist_ok=True)
    return folder / f"{key}.lock"


def path_lock(path: str | os.PathLike[str]) -> FileLock:
    """A blocking lock on ``path`` (use as a context manager)."""
    return FileLock(str(path_lock_file(path)))


@contextmanager
def exclusive_writer(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold ``path`` for writing, or raise at once if another process does.

    Args:
        path: The file or folder written.
        what: What it is, for the message (``"answers file"``).

    Raises:
        WriterBusyError: Another process holds it (its PID is in the message).
    """
    lock_file = path_lock_file(path)
    pid_file = lock_file.with_suffix(".pid")
    lock = FileLock(str(lock_file))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.is_file() else "unknown"
        raise WriterBusyError(
            f"{what} {path} is being written by another process (PID {holder}); wait for it to finish, or "
            "write to another path."
        ) from None
    try:
        pid_file.write_text(str(os.getpid()))
        yield
    finally:
        pid_file.unlink(missing_ok=True)
        lock.release()
