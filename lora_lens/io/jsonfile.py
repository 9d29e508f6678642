"""Strict JSON for untrusted files: duplicate keys, deep nesting and bad UTF-8 refused.

Python's ``json`` keeps the *last* of two equal keys, so a file can say one
thing to lora_lens and another to a reader that keeps the first; both are
refused here. Nesting deeper than Python's recursion limit (the C parser
raises ``RecursionError`` at about 1,000 levels) is refused too. Every failure is one :class:`ConfigError` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from .files import MAX_JSON_BYTES, read_bounded

class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def loads_strict(data: bytes | str, where: str, expected: str):
    """Parse JSON; ``where`` names the source (file, or file + part) in messages."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: is not UTF-8 text (byte {e.start}); expected {expected}.") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise ConfigError(f"{where}: key {str(e)!r} appears twice in one JSON object; expected {expected} "
                          "with unique keys. The file is ambiguous: fix or re-save it.") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: invalid JSON ({e.msg} at line {e.lineno}); expected {expected}. "
                          "Fix or re-save it.") from None
    except RecursionError:  # the C parser counts its depth against Python's recursion limit
        raise ConfigError(f"{where}: JSON nested too deeply to be a config; expected {expected}.") from None


def read_json(path: Path, expected: str, max_bytes: int = MAX_JSON_BYTES):
    """Read and strictly parse a JSON file (a regular file of at most ``max_bytes``)."""
    return loads_strict(read_bounded(path, expected, max_bytes), str(path), expected)
