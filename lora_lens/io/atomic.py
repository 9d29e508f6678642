"""Atomic writes: a reader never sees a half-written file or folder.

Files are written to a temporary name in the same folder, flushed and then
renamed over the target (``os.replace`` is atomic on one file system). Folders
are built in a temporary sibling and renamed into place at the end, so a
failure half-way leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save as save_safetensors_bytes

from ..errors import ConfigError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors; ``metadata`` values must be strings (provenance)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return atomic_write_bytes(path, save_safetensors_bytes(clean, metadata=meta))


#: Every file or folder read in this process (resolved). An output folder that
#: holds one of them is never replaced, so ``--overwrite`` cannot delete an input.
_INPUTS: set[Path] = set()


def register_input(path: str | os.PathLike) -> None:
    """Record a path this process reads from; :func:`check_destination` will never replace it."""
    _INPUTS.add(Path(path).resolve())


def check_destination(dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that :func:`atomic_directory` would refuse; call it before long work.

    Refused: a file; a non-empty folder without ``overwrite``; and, even with
    ``overwrite``, the current folder or one holding it, or a folder that is or
    holds an input of this process (an adapter, a base, an init folder).
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest}: exists and is a file; expected a folder to write into. Choose another -o path.")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ConfigError(f"{dest}: folder exists and is not empty; pass --overwrite to replace it or choose another -o path.")
        resolved, cwd = dest.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise ConfigError(f"{dest}: is the current folder or holds it; refusing to replace it. Choose a new -o folder.")
        held = sorted(str(p) for p in _INPUTS if p == resolved or resolved in p.parents)
        if held:
            raise ConfigError(f"{dest}: holds an input of this run ({held[0]}); replacing it would delete that input. "
                              "Choose another -o folder.")
    return dest


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``dest`` in one rename.

    An existing non-empty ``dest`` is refused unless ``overwrite`` is set, in
    which case it is replaced only after the new folder is complete.
    """
    dest = check_destination(dest, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like any new folder
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
