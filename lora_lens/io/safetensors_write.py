"""Serialize tensors as safetensors bytes, the same bytes for the same tensors every time.

The safetensors library keeps ``__metadata__`` in a hash map, so two saves of
the same tensors can differ in the order of its keys. Here the header is
written in a fixed order: ``__metadata__`` first with sorted keys, then the
tensors sorted by descending item size and name (the library's own order,
which keeps every tensor aligned to its item size), as compact JSON padded
with spaces to a multiple of 8 bytes. Data is little-endian, row-major.
"""

from __future__ import annotations

import json
import struct
import sys

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (CPU, any layout) and string ``metadata``."""
    if sys.byteorder != "little":  # pragma: no cover - every platform torch supports today
        raise NotImplementedError("writing safetensors needs a little-endian machine")
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    chunks, offset = [], 0
    for name in order:
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor '{name}': dtype {t.dtype} cannot be written as safetensors")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)
