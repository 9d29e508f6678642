"""Atomic writes: a reader never sees a half-written file or folder.

Files are written to a temporary name in the same folder, flushed and then
renamed over the target (``os.replace`` is atomic on one file system). Folders
are built in a temporary sibling and renamed into place at the end, so a
failure half-way leaves nothing behind.

A process killed outright (SIGKILL, power loss) cannot clean up: its
temporaries are named ``.<name>.tmp-<pid>-…`` (and a replaced folder
``.<name>.old-<pid>``) so that the next write to the same destination removes
those whose process is gone. While a process writes a destination it holds an
exclusive ``flock`` on ``.<name>.lock`` beside it (claimed by
:func:`check_destination`, before the long work); a second process writing
the same destination is refused instead of racing it. The kernel drops the
lock when its holder dies, so a killed run never blocks the next one.

Disk full (``ENOSPC``/``EDQUOT``) raises :class:`DiskFullError` after the
temporaries are removed; a destination that cannot be written (read-only,
permission denied) is a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError, ConfigError, DiskFullError
from .files import missing
from .safetensors_write import safetensors_bytes

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def _read_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import, before any thread writes
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-…`` / ``.<name>.old-<pid>`` siblings of ``path`` left by dead processes.

    Also the temporaries and lock files of writes nested inside such a temporary
    folder (``..<name>.tmp-<pid>-….tmp-…``): they belong to the same dead process.
    """
    path = Path(path)
    pattern = re.compile(rf"\.+{re.escape(path.name)}\.(?:tmp-(\d+)-.*|old-(\d+).*)")
    removed = []
    with contextlib.suppress(OSError):
        for p in path.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m and not _pid_alive(int(m.group(1) or m.group(2))):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _os_error(e: OSError, path: Path) -> Exception:
    """A write failure as the error the user can act on (or ``e`` itself)."""
    if e.errno in _NO_SPACE:
        return DiskFullError(e.errno, f"{path}: no space left while writing ({e.strerror}); nothing was written. "
                                      "Free some space or choose another -o folder.")
    if e.errno in _NOT_WRITABLE:
        return ConfigError(f"{path}: cannot be written ({e.strerror}); choose a writable -o folder.")
    return e


def _write_all(f, data: bytes) -> None:
    """Write, flush and fsync; the one place bytes reach the disk (tests inject faults here)."""
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        clear = _os_error(e, path) if isinstance(e, OSError) and not isinstance(e, DiskFullError) else e
        if clear is not e:
            raise clear from None
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` through :func:`lora_lens.jsonable.to_jsonable` (NaN → null): strict JSON, in one rename."""
    from ..jsonable import to_jsonable

    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as safetensors; ``metadata`` values must be strings (provenance)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return atomic_write_bytes(path, safetensors_bytes(clean, metadata=meta))


#: Every file or folder read in this process (resolved). An output folder that
#: holds one of them is never replaced, so ``--overwrite`` cannot delete an input.
_INPUTS: set[Path] = set()


def register_input(path: str | os.PathLike) -> None:
    """Record a path this process reads from; :func:`check_destination` will never replace it.

    Every reader calls it first, so a path that cannot be resolved (a symlink loop, which
    ``Path.resolve`` raises as RuntimeError or OSError) is refused here, once for every command.
    """
    path = Path(path)
    try:
        _INPUTS.add(path.resolve())
    except (RuntimeError, OSError):
        what = missing(path) if path.is_symlink() else "passes through a symlink loop"
        raise CheckpointError(f"{path}: {what}; expected an existing file or folder. Fix the link.") from None


def check_destination(dest: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output folder that :func:`atomic_directory` would refuse, and claim it; call it before long work.

    Refused: a file; a non-empty folder without ``overwrite``; and, even with
    ``overwrite``, the current folder or one holding it, or a folder that is or
    holds an input of this process (an adapter, a base, an init folder); a
    destination another process is writing (see the module docstring). The
    claim lasts until :func:`atomic_directory` on ``dest`` ends, or the process.
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
    _claim(dest)
    return dest


#: Destinations this process has claimed: resolved path → (lock file, its open descriptor).
_LOCKS: dict[Path, tuple[Path, int]] = {}


def _claim(dest: Path) -> None:
    """Hold an exclusive flock on ``.<name>.lock`` beside ``dest`` (re-entrant within this process)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): writes stay atomic, only unguarded
        return
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, dest) from None
    key = dest.parent.resolve() / dest.name
    if key in _LOCKS:
        return
    lock = key.parent / f".{dest.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise _os_error(e, dest) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"{dest}: another lora-lens process (pid {holder}) is writing it now; wait for it to "
                              "finish or choose another -o folder.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # its holder released and removed it between our open and flock
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _LOCKS[key] = (lock, fd)


def _release(dest: Path) -> None:
    entry = _LOCKS.pop(dest.parent.resolve() / dest.name, None)
    if entry is not None:
        lock, fd = entry
        with contextlib.suppress(OSError):
            os.unlink(lock)  # before closing: a waiter that opened the old file sees it is gone and retries
        os.close(fd)


@atexit.register
def _release_all() -> None:
    for key in list(_LOCKS):
        _release(key)


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``dest`` in one rename.

    An existing non-empty ``dest`` is refused unless ``overwrite`` is set, in
    which case it is replaced only after the new folder is complete. Between
    the two renames of a replacement the old folder is at ``.<name>.old-<pid>``;
    a kill exactly there leaves ``dest`` absent, never partial.
    """
    dest = check_destination(dest, overwrite)
    tmp = old = None
    try:
        clean_stale_temporaries(dest)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(dest), dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; the result should look like any new folder
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        if old is not None and old.exists() and not dest.exists():
            os.replace(old, dest)  # the new folder could not take its place: the previous output comes back
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        clear = _os_error(e, dest) if isinstance(e, OSError) and not isinstance(e, DiskFullError) else e
        if clear is not e:
            raise clear from None
        raise
    finally:
        _release(dest)
