"""The one JSON converter: numpy/torch arrays and scalars, tuples, dataclasses and paths → plain JSON values.

JSON has no NaN or infinity: they become ``null``, so every file and every ``--json`` line lora_lens writes
parses with any strict JSON reader (``json.dumps(..., allow_nan=False)`` after this). Imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

from .errors import ConfigError


def to_jsonable(obj: Any, where: str = "json_data") -> Any:
    """Plain JSON values from numpy/torch arrays and scalars, tuples, dataclasses; NaN/Inf → null."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name), f"{where}.{f.name}") for f in dataclasses.fields(obj)}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ConfigError(f"{where}: a {type(obj).__name__} cannot be written to JSON; pass numbers, strings, lists, "
                      "dicts or arrays.")
