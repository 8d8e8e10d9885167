"""Files a command writes beside the study (plots, exported layers): whole or not at all.

A file is written under a temporary name in its own folder, flushed to the disk, and renamed
over its name in one step, so that a full disk, a kill or a crash never leaves a truncated PNG
or a half module where the file was; the earlier file, if any, stays as it was.
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, IO

from opsearch.errors import UserError


def write_atomically(path: str, write: Callable[[IO], None], mode: str = "w") -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`.

    A full disk (or quota) raises DiskFull naming `path` (exit status 4); any other OSError a
    UserError naming it. Nothing is left behind either way."""
    from opsearch.study import DISK_FULL_ERRNOS, disk_full_error

    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp: 0600)
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if e.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(OSError(e.errno, e.strerror, path)) from None
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
