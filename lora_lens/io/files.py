"""Checks before opening an input: a regular file, of a size worth reading.

Opening a FIFO blocks until a writer appears and a device file (``/dev/zero``)
never ends, so every reader calls :func:`require_regular_file` first; it
follows symlinks once and names a loop instead of reporting "not found".
:func:`read_bounded` reads a small text file (a JSON config) and refuses one
larger than the limit before reading it, so memory stays bounded by what the
caller expects, not by what the file holds.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import CheckpointError

#: Configs, indexes and headers are kilobytes; a few MB already means a wrong file.
MAX_JSON_BYTES = 64 * 1024 * 1024


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device file"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular_file(path: Path, expected: str) -> os.stat_result:
    """``os.stat(path)`` when it is a regular file, else :class:`CheckpointError` naming what it is.

    ``expected`` completes "expected …" in the message (e.g. "a .safetensors file").
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: is a symlink loop; expected {expected}. Fix the link.") from None
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CheckpointError(f"{path}: file not found; expected {expected}. Check the path.") from None
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); expected {expected}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: is {_kind(st.st_mode)}; expected {expected}. Pass the file itself.")
    return st


def missing(path: Path) -> str:
    """Why an absent-looking path is absent: a symlink loop or dangling link, or nothing there."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            return "is a symlink loop" if e.errno == errno.ELOOP else "is a symlink to nothing (dangling)"
    return "no such file or folder"


def read_bounded(path: Path, expected: str, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a regular file no larger than ``max_bytes`` (checked before reading)."""
    st = require_regular_file(path, expected)
    if st.st_size > max_bytes:
        raise CheckpointError(
            f"{path}: is {st.st_size:,} bytes; expected {expected} of at most {max_bytes:,} bytes. "
            "Check that this is the right file."
        )
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # +1: a file that grew since stat is still caught
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror}); expected {expected}.") from None
    if len(data) > max_bytes:
        raise CheckpointError(f"{path}: is larger than {max_bytes:,} bytes; expected {expected}.")
    return data
