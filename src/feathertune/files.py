"""Atomic file writes: a reader (or a resumed run) sees the old content or the new, never half.

Data goes to a temporary file in the same directory (a rename is atomic only within one file
system), is flushed to disk, and then replaces the target; on any failure the temporary file goes.
What is published gets the modes a plain `open()` or `mkdir` would give it (0666 / 0777 minus the
umask): temporary files and directories are created private (0600 / 0700), and that must not leak.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Let `write(temporary_path)` produce the file, then move it over `path`. Parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` atomically."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(payload))


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Let `write(temporary_directory)` fill a directory, then put it in place of `path`.

    An existing `path` is replaced only once the new directory is complete, so a failure or a kill
    leaves the old one (or nothing) and at worst a hidden temporary directory beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        usual_modes(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_modes(directory: str | os.PathLike) -> None:
    """Give `directory` and everything in it the modes open() and mkdir would: 0666 / 0777 minus
    the umask (some writers, transformers' save_pretrained among them, leave files 0600)."""
    mask = _umask()
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it
    os.umask(mask)
    return mask
