"""Validate a safetensors header before any library maps the file.

Layout: ``N`` (u64, little-endian), ``N`` bytes of UTF-8 JSON, then the data
buffer of ``D = size − 8 − N`` bytes. The JSON maps each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data
buffer) plus an optional ``"__metadata__"``: string → string, or ``null`` —
MLX (``mlx.core.save_safetensors``, so every MLX-LM ``adapters.safetensors``)
writes ``"__metadata__":null`` when it has none, and the safetensors library
reads that as no metadata, so it is accepted here too.

Checked here, all from the header and ``os.stat`` — nothing is allocated in
proportion to a size the file claims: ``N`` is at most ``min(size − 8,
MAX_HEADER_BYTES)`` before the header is read; each tensor's byte count
``prod(shape) · itemsize`` is an exact Python integer and must equal
``end − begin``; sorted by ``begin``, the tensors tile ``[0, D)`` exactly
(no overlap, no gap, nothing past the end); keys are unique.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .files import require_regular_file
from .jsonfile import loads_strict

#: The safetensors library's own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000

#: Bytes per element of every dtype safetensors defines (F8 variants are one byte).
ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}

_EXPECTED = "a safetensors file"


def _bad(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a valid safetensors file ({what}); it may be truncated or not a checkpoint. "
                           "Re-download or re-save it.")


def read_safetensors_header(path: Path) -> dict:
    """The validated header: ``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``."""
    size = require_regular_file(path, _EXPECTED).st_size
    if size < 8:
        raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise _bad(path, f"header claims {n:,} bytes but the file has {size - 8:,} after the length")
        if n > MAX_HEADER_BYTES:
            raise _bad(path, f"header of {n:,} bytes exceeds the {MAX_HEADER_BYTES:,}-byte limit")
        raw = f.read(n)
    try:
        header = loads_strict(raw, f"{path} (header)", "a safetensors JSON header")
    except ConfigError as e:
        raise _bad(path, str(e).split(": ", 1)[1].split("; expected")[0]) from None
    if not isinstance(header, dict):
        raise _bad(path, f"header is a JSON {type(header).__name__}, not an object")
    _check_entries(path, header, size - 8 - n)
    return header


def _check_entries(path: Path, header: dict, data_len: int) -> None:
    meta = header.get("__metadata__")  # absent or null (MLX's writer): no metadata
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        found = "has non-string values" if isinstance(meta, dict) else f"is a JSON {type(meta).__name__}"
        raise _bad(path, f"'__metadata__' {found}; expected null or an object of strings to strings")
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict):
            raise _bad(path, f"tensor '{name}' is described by a {type(e).__name__}, not an object")
        dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            raise _bad(path, f"tensor '{name}' has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _bad(path, f"tensor '{name}' has shape {shape!r}; expected a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise _bad(path, f"tensor '{name}' has data_offsets {offsets!r}; expected [begin, end] with begin ≤ end")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]  # exact: Python ints never overflow
        if offsets[1] - offsets[0] != nbytes:
            raise _bad(path, f"tensor '{name}' of shape {shape} {dtype} needs {nbytes:,} bytes but its offsets "
                             f"span {offsets[1] - offsets[0]:,}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin != pos:
            what = "overlaps" if begin < pos else "leaves a gap after"
            raise _bad(path, f"tensor '{name}' at bytes [{begin:,}, {end:,}) {what} "
                             f"{repr(prev) if prev else 'the start of the data'} (ending at {pos:,})")
        pos, prev = end, name
    if pos != data_len:
        raise _bad(path, f"tensors cover {pos:,} data bytes but the file holds {data_len:,}")


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
