"""Builders for hostile and odd input files, shared by the reliability and fuzz tests.

Everything is written by hand from bytes, so a test controls exactly what a
header or a zip directory claims.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from lora_lens.errors import LoraLensError

PREFIX = "base_model.model.model.layers.0.self_attn."
CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
          "base_model_name_or_path": "tiny"}


def seed_tensors() -> dict[str, torch.Tensor]:
    """Two LoRA pairs (rank 2, 8×8 weights), fixed values."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for m in ("q_proj", "v_proj"):
        out[f"{PREFIX}{m}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        out[f"{PREFIX}{m}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    return out


def seed_safetensors() -> bytes:
    return st_save(seed_tensors(), metadata={"format": "pt"})


def seed_torch_zip() -> bytes:
    buf = io.BytesIO()
    torch.save(seed_tensors(), buf)
    return buf.getvalue()


def write_adapter(folder: Path, config: dict | str | bytes | None = None, weights: bytes | None = None,
                  weights_name: str = "adapter_model.safetensors") -> Path:
    """A PEFT adapter folder; ``config`` may be raw text/bytes to write verbatim."""
    folder.mkdir(parents=True, exist_ok=True)
    config = CONFIG if config is None else config
    data = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (folder / "adapter_config.json").write_bytes(data.encode() if isinstance(data, str) else data)
    (folder / weights_name).write_bytes(seed_safetensors() if weights is None else weights)
    return folder


def safetensors_from(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file with this JSON header (``header_len`` overrides the length field)."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def claim_size_in_zip(blob: bytes, member_suffix: str, claimed: int) -> bytes:
    """Rewrite the central directory so the member ending in ``member_suffix`` claims ``claimed`` bytes.

    Sizes ≥ 4 GiB are written as zip64 (0xFFFFFFFF in the 32-bit fields and an
    0x0001 extra field with the 64-bit sizes), as a real archive would.
    """
    eocd = blob.rindex(b"PK\x05\x06")
    cd_size, cd_off = struct.unpack("<II", blob[eocd + 12:eocd + 20])
    cd, out, pos = blob[cd_off:cd_off + cd_size], [], 0
    while pos < len(cd):
        nlen, elen, clen = struct.unpack("<HHH", cd[pos + 28:pos + 34])
        end = pos + 46 + nlen + elen + clen
        entry = bytearray(cd[pos:end])
        name = bytes(entry[46:46 + nlen]).decode()
        if name.endswith(member_suffix):
            if claimed < 0xFFFFFFFF:
                entry[20:28] = struct.pack("<II", claimed, claimed)
            else:
                entry[20:28] = struct.pack("<II", 0xFFFFFFFF, 0xFFFFFFFF)
                extra = struct.pack("<HHQQ", 1, 16, claimed, claimed)
                entry[30:32] = struct.pack("<H", elen + len(extra))
                entry = entry[:46 + nlen] + extra + entry[46 + nlen:]
        out.append(bytes(entry))
        pos = end
    new_cd = b"".join(out)
    tail = bytearray(blob[eocd:])
    tail[12:16] = struct.pack("<I", len(new_cd))
    return blob[:cd_off] + new_cd + bytes(tail)


def reads_or_refuses(fn, *args):
    """Call a reader: a result, or None when it raised lora_lens's bad-input error (anything else propagates)."""
    try:
        return fn(*args)
    except LoraLensError:
        return None
