"""Type and range checks for the fields of ``adapter_config.json`` lora_lens uses.

PEFT's ``LoraConfig`` is a dataclass without runtime type checks, so a config
saying ``"r": "8"`` or ``"use_rslora": "false"`` would load and then compute a
wrong scaling (``bool("false")`` is True). Each field is checked for the type
PEFT writes; the first wrong one is named with what was found and what was
expected. ``base_model_name_or_path`` is only ever kept as text: lora_lens
never fetches it, whatever it holds (a hub id, a path, a URL).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError

#: No weight matrix has more rows or columns than this; a larger rank is a typo or a hostile file.
MAX_RANK = 1 << 20


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _fail(path: Path, key: str, value, expected: str) -> ConfigError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "…"
    return ConfigError(f"{path}: '{key}' is {shown} ({type(value).__name__}); expected {expected}. "
                       "Fix the config to match the saved adapter.")


def _rank(path: Path, key: str, value) -> int:
    if not _is_int(value):
        raise _fail(path, key, value, "a positive integer rank (a JSON number without quotes or decimals)")
    if not 1 <= value <= MAX_RANK:
        raise _fail(path, key, value, f"a rank between 1 and {MAX_RANK:,}")
    return value


def _alpha(path: Path, key: str, value) -> float:
    if not _is_number(value):
        raise _fail(path, key, value, "a finite number")
    return float(value)


def _pattern(path: Path, key: str, value, check) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, value, "an object mapping module names to values")
    return {k: check(path, f"{key}.{k}", v) for k, v in value.items()}


def _flag(path: Path, key: str, value) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(path, key, value, "true or false")
    return value


def _names(path: Path, key: str, value, allow_str: bool):
    if value is None or (allow_str and isinstance(value, str)):
        return value
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, key, value, "a list of module names" + (" or one regex string" if allow_str else "") + " or null")
    return value


def checked_fields(raw: dict, path: Path) -> dict:
    """The typed fields of a PEFT LoRA config (defaults as PEFT's), or :class:`ConfigError`."""
    base = raw.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise _fail(path, "base_model_name_or_path", base, "a string or null")
    init = raw.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)):
        raise _fail(path, "init_lora_weights", init, "true, false or a method name")
    return {
        "r": _rank(path, "r", raw.get("r", 8)),
        "lora_alpha": _alpha(path, "lora_alpha", raw.get("lora_alpha", 8)),
        "rank_pattern": _pattern(path, "rank_pattern", raw.get("rank_pattern"), _rank),
        "alpha_pattern": _pattern(path, "alpha_pattern", raw.get("alpha_pattern"), _alpha),
        "use_rslora": _flag(path, "use_rslora", raw.get("use_rslora")),
        "fan_in_fan_out": _flag(path, "fan_in_fan_out", raw.get("fan_in_fan_out")),
        "use_dora": _flag(path, "use_dora", raw.get("use_dora")),
        "target_modules": _names(path, "target_modules", raw.get("target_modules"), allow_str=True),
        "modules_to_save": tuple(_names(path, "modules_to_save", raw.get("modules_to_save"), allow_str=False) or ()),
        "init_lora_weights": init,
        "base_model_name_or_path": base,
    }
