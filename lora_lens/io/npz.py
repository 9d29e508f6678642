"""Read ``.npz`` archives without unpickling and without trusting claimed sizes.

An ``.npz`` is a zip of ``.npy`` members: a header (magic, version, a Python
literal dict with ``descr``, ``fortran_order``, ``shape``) then raw data.
``numpy.load`` would unpickle object arrays when asked to and allocates
``prod(shape)`` elements before reading a byte, so each member is checked
first: plain (non-object) dtype, and ``header + prod(shape)·itemsize`` equal to
the member's size, which must itself fit in the file (stored) or within
deflate's largest ratio of its compressed bytes. Only then is the data read.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, UnsafeFileError
from .files import require_regular_file

#: Deflate cannot expand data by more than about 1032:1.
_MAX_DEFLATE_RATIO = 1032
_LOCAL_HEADER = 30


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid .npz archive ({what}); re-save it with numpy.savez.")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """``{name: array}`` for every member (``.npy`` suffix dropped); object arrays refused unread."""
    size = require_regular_file(path, "an .npz archive").st_size
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # numpy's own test; zipfile alone would skip leading junk
            raise _bad(path, "it does not start with a zip entry")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:  # e.g. 'zip file version 10.9'
        raise _bad(path, str(e)) from None
    out: dict[str, np.ndarray] = {}
    with z:
        for info in z.infolist():
            _check_entry(path, info, size)
            name = info.filename.removesuffix(".npy")
            try:
                with z.open(info) as f:
                    out[name] = _read_member(path, info, f)
            except CheckpointError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, TypeError, EOFError, SyntaxError, NotImplementedError) as e:
                raise _bad(path, f"member '{info.filename}': {e}") from None
    return out


def _check_entry(path: Path, info: zipfile.ZipInfo, size: int) -> None:
    end = info.header_offset + _LOCAL_HEADER + len(info.filename.encode()) + info.compress_size
    if end > size:
        raise _bad(path, f"member '{info.filename}' claims {info.compress_size:,} bytes past the end of the file")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise _bad(path, f"stored member '{info.filename}' claims {info.file_size:,} bytes but holds "
                             f"{info.compress_size:,}")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 64:
            raise _bad(path, f"member '{info.filename}' claims {info.file_size:,} bytes from "
                             f"{info.compress_size:,} compressed; deflate cannot expand that much")
    else:
        raise _bad(path, f"member '{info.filename}' uses zip method {info.compress_type}; expected stored or deflated")


def _read_member(path: Path, info: zipfile.ZipInfo, f) -> np.ndarray:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        raise _bad(path, f"member '{info.filename}' has .npy version {version}")
    if dtype.hasobject:
        raise UnsafeFileError(
            f"{path}: refused: member '{info.filename}' is an object array, which only unpickling could read. "
            "lora_lens never unpickles; save plain numeric arrays (numpy.savez with float or int arrays)."
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if f.tell() + nbytes != info.file_size:
        raise _bad(path, f"member '{info.filename}' of shape {shape} {dtype} needs {nbytes:,} data bytes but holds "
                         f"{info.file_size - f.tell():,}")
    data = bytearray(f.read(nbytes))  # bounded by the checked member size; writable for torch.from_numpy
    if len(data) != nbytes:
        raise _bad(path, f"member '{info.filename}' is truncated")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)
