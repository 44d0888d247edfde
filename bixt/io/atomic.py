"""Atomic file writes: a crash mid-write never leaves a broken file where a good one was."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _default_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask  # what open() gives; mkstemp's temporary files are private (0600)


_FILE_MODE = _default_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; on success it is fsynced, given open()'s default mode and
    renamed over `path`; on any failure it is removed and `path` is left as it was."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _naming(e, path, None) from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            _naming(e, path, tmp)
        raise


def _naming(e: OSError, path: Path, tmp: str | None) -> OSError:
    """The error names the file the user asked for, not the hidden temporary one (or none: a full disk's write
    error carries no name), so that a message like "no space left on device while writing PATH" names PATH. An
    OSError made from a bare message (no errno) is left alone: a file name would replace its text."""
    if e.errno is not None and (e.filename is None or tmp is None or str(e.filename) == tmp):
        e.filename = str(path)
    return e


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
