"""The fuzz harness shared by tests/test_fuzz_readers.py (hypothesis, bounded) and scripts/fuzz_readers.py (long runs).

A case is a reader kind plus a mutated input built from a valid seed, either
byte-wise (flip, set, insert, delete bytes; truncate) or structurally (a
header field, a config value, a zip size claim replaced by an odd value).
:func:`check_case` writes the input into a fresh folder, runs the real reader
under a time limit and returns ``"read"`` or ``"refused"``; any other outcome
(another exception, a hang, a wrong read) raises :class:`FuzzFailure`.
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load

from lora_lens.errors import LoraLensError
from lora_lens.io.npz import read_npz
from lora_lens.io.peft import load_adapter

from .hostile_files import CONFIG, claim_size_in_zip, seed_safetensors, seed_tensors, seed_torch_zip, split_safetensors

KINDS = ("safetensors", "config", "torchzip", "npz")
BYTE_OPS = ("flip", "set", "insert", "delete", "truncate")
#: Values a hostile file might put anywhere a number, list or string is expected.
ODD_VALUES = (0, -1, 1, 2, 3, 7, 8, 64, 65, 2**31, 2**32 + 1, 2**63, 2**64 + 5, 10**12, -(2**63), 1.5, 1e308, -0.0,
              float("nan"), float("inf"), "", "8", "F32", "BF16", "I64", "lora_A", None, True, False, [], [0], [2, 8],
              [8, 2], [0, 0], [-1, 4], [0, 64], [64, 128], [2**62, 2**63], {}, {"a": 1}, [[[[]]]])
#: Header fields of one safetensors entry, and config keys, that structural mutations target.
ST_FIELDS = ("dtype", "shape", "data_offsets", "extra")
CONFIG_KEYS = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out", "use_dora",
               "target_modules", "modules_to_save", "init_lora_weights", "base_model_name_or_path", "peft_type")


class FuzzFailure(AssertionError):
    """A reader did something other than read correctly or refuse with lora_lens's error."""


def seed_bytes(kind: str) -> bytes:
    if kind == "safetensors":
        return seed_safetensors()
    if kind == "config":
        return json.dumps(CONFIG).encode()
    if kind == "torchzip":
        return seed_torch_zip()
    buf = io.BytesIO()
    np.savez(buf, **{k.replace(".", "_"): v.numpy() for k, v in seed_tensors().items()})
    return buf.getvalue()


def mutate_bytes(blob: bytes, ops: list[tuple[int, str, int]]) -> bytes:
    """Apply byte edits; positions wrap around the current length."""
    b = bytearray(blob)
    for pos, op, val in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << (val % 8)
        elif op == "set":
            b[i] = val % 256
        elif op == "insert":
            b[i:i] = bytes([val % 256]) * (1 + val % 7)
        elif op == "delete":
            del b[i:i + 1 + val % 7]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


def mutate_structure(kind: str, blob: bytes, choice: int, value) -> bytes:
    """One structural edit chosen by ``choice``, setting something to ``value``."""
    if kind == "safetensors":
        header, data = split_safetensors(blob)
        names = sorted(k for k in header if k != "__metadata__")
        what = choice % 5
        if what == 4:  # lie about the header length
            raw = json.dumps(header).encode()
            delta = value if isinstance(value, int) and not isinstance(value, bool) else 1
            return struct.pack("<Q", max(0, len(raw) + delta) % 2**64) + raw + data
        if what == 3:  # metadata of another type, or a duplicate tensor name
            if choice % 2:
                header["__metadata__"] = value
            else:
                raw = json.dumps(header).encode()
                dup = json.dumps({names[0]: header[names[choice % len(names)]]}).encode()[1:-1]
                raw = raw[:-1] + b"," + dup + b"}"
                return struct.pack("<Q", len(raw)) + raw + data
        else:
            entry = header[names[choice % len(names)]]
            field = ST_FIELDS[(choice // 5) % len(ST_FIELDS)]
            if field == "shape" and isinstance(value, int) and not isinstance(value, bool):
                entry["shape"] = [value, entry["shape"][-1]]
            else:
                entry[field] = value
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data
    if kind == "config":
        cfg = json.loads(blob)
        key = CONFIG_KEYS[choice % len(CONFIG_KEYS)]
        if (choice // len(CONFIG_KEYS)) % 4 == 3:
            cfg.pop(key, None)
        else:
            cfg[key] = value
        return json.dumps(cfg).encode()
    if kind in ("torchzip", "npz"):
        names = zipfile.ZipFile(io.BytesIO(blob)).namelist()
        claimed = value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**64 else 2**40
        return claim_size_in_zip(blob, names[choice % len(names)], claimed)
    raise ValueError(kind)


@contextlib.contextmanager
def time_limit(seconds: int):
    """SIGALRM after ``seconds``: a hang becomes a FuzzFailure instead of a frozen run (main thread, Unix)."""
    def on_alarm(signum, frame):
        raise FuzzFailure(f"reader still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def check_case(kind: str, blob: bytes, seconds: int = 10) -> str:
    """``"read"`` (and the read matches an independent reader) or ``"refused"``; else FuzzFailure."""
    with tempfile.TemporaryDirectory() as d, time_limit(seconds):
        folder = Path(d)
        try:
            return _read(kind, blob, folder)
        except LoraLensError:
            return "refused"
        except FuzzFailure:
            raise
        except Exception as e:  # noqa: BLE001 - exactly what the fuzzer hunts for
            raise FuzzFailure(f"{kind}: {type(e).__name__}: {e}") from e


def _read(kind: str, blob: bytes, folder: Path) -> str:
    if kind == "npz":
        (folder / "x.npz").write_bytes(blob)
        arrays = read_npz(folder / "x.npz")
        _same(arrays, np.load(io.BytesIO(blob), allow_pickle=False), kind)
        return "read"
    config = blob if kind == "config" else json.dumps(CONFIG).encode()
    weights = {"safetensors": blob, "torchzip": blob}.get(kind, seed_safetensors())
    name = "adapter_model.bin" if kind == "torchzip" else "adapter_model.safetensors"
    (folder / "adapter_config.json").write_bytes(config)
    (folder / name).write_bytes(weights)
    adapter = load_adapter(folder)
    if kind == "safetensors":  # what was read must be what the reference reader sees in the same bytes
        ref = st_load(blob)
        for m in adapter.modules:
            for role, t in (("A", m.A), ("B", m.B)):
                key = f"base_model.model.{m.name}.lora_{role}.weight"
                if not torch.equal(ref[key].reshape(t.shape), t):
                    raise FuzzFailure(f"{kind}: {key} differs from safetensors' own reading")
    if kind == "config" and not adapter.modules:
        raise FuzzFailure("config: an adapter without modules was accepted")
    return "read"


def _same(ours: dict, ref, kind: str) -> None:
    for k, v in ours.items():
        if not np.array_equal(v, ref[k], equal_nan=v.dtype.kind in "fc"):
            raise FuzzFailure(f"{kind}: member {k} differs from numpy's own reading")
