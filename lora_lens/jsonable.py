"""The one JSON converter: numpy/torch arrays and scalars, tuples, dataclasses and paths → plain JSON values.

JSON has no NaN or infinity: they become ``null``, so every file and every ``--json`` line lora_lens writes
parses with any strict JSON reader (``json.dumps(..., allow_nan=False)`` after this). Imports no torch.

Every top-level result lora_lens writes to a file or prints with ``--json`` goes through :func:`stamp`,
which adds ``kind``, ``lora_lens_version`` and the kind's ``schema`` version from :data:`SCHEMAS`
(documented in docs/formats.md, "JSON results").
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Any, ClassVar, Mapping

from .errors import ConfigError

#: Schema version of each kind of top-level JSON result. Bump a kind's number when one of its fields is
#: removed, renamed or changes meaning (adding a field keeps the number); docs/formats.md lists the fields.
SCHEMAS: dict[str, int] = {
    "adapter": 1, "adapters": 1, "base": 1,                          # lora-lens inspect
    "spectra": 1,                                                    # lora-lens spectrum
    # 2: "k" is the k used (was the k asked for, null for all; that is now "k_requested").
    # 3 (pairwise 2): "side" is out | in | both (was left | right), with "side_note"; "dim_in" for both.
    "layer_similarity": 3, "adapter_similarity": 3, "pairwise_similarity": 2,  # lora-lens similarity
    "alignment": 1, "intruders": 1, "alignment_analysis": 1,         # lora-lens alignment
    # 2: one φ per pair: "side" (default out, was both sides averaged), each pair at its own k;
    # modules[].k is per member (was one k per module), modules[].random_phi at each pair's k.
    "collection": 2,                                                 # lora-lens collection, collection.json
    "condlora_analysis": 1,                                          # lora-lens condlora analyze
    "init": 1, "reduced_adapter": 1, "cora_basis": 1,                # init commands, reduce, cora_basis.json
    "train_result": 1, "train_run": 1,                               # lora-lens train --json, train_log.json
    "comparison": 1, "comparison_summary": 1,                        # compare-methods results.json, --json
    # analysis 2: its layer_similarity and pairs are schema 3 (side out | in | both)
    "analysis": 2, "report": 1, "report_written": 1,                 # results.json's data, results.json, --json
    "converted": 1,                                                  # lora-lens convert --json
    "resized_adapter": 1, "merged_adapter": 1,                       # lora-lens resize / merge --json
    "demo": 1, "demo_run": 1,                                        # lora-lens demo --json, demo.json
    "extraction": 1, "intruder_reduction": 1,                        # lora-lens extract / intruders --json
}


def stamp(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` as a top-level result: ``{"kind", "lora_lens_version", "schema", **payload}``."""
    from . import __version__

    if kind not in SCHEMAS:
        raise ValueError(f"unknown result kind {kind!r}; add it to lora_lens.jsonable.SCHEMAS and docs/formats.md.")
    return {"kind": kind, "lora_lens_version": __version__, "schema": SCHEMAS[kind], **payload}


def to_jsonable(obj: Any, where: str = "json_data") -> Any:
    """Plain JSON values from numpy/torch arrays and scalars, tuples, dataclasses; NaN/Inf → null.

    A dataclass with its own ``to_dict()`` (one that reshapes its fields) is written through it.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "detach"):  # torch tensor: its own tolist, since numpy has no bfloat16
        return to_jsonable(obj.detach().cpu().tolist(), where)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy array or scalar
        return to_jsonable(obj.tolist(), where)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        to_dict = getattr(obj, "to_dict", None)
        if to_dict is not None and not _required_args(to_dict):
            return to_jsonable(to_dict(), where)
        return fields_dict(obj, where=where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise ConfigError(f"{where}: a {type(obj).__name__} cannot be written to JSON; pass numbers, strings, lists, "
                      "dicts or arrays.")


def fields_dict(obj: Any, *, exclude: tuple[str, ...] = (), where: str = "json_data") -> dict[str, Any]:
    """A dataclass's fields (less ``exclude``), each through :func:`to_jsonable`, in field order."""
    return {f.name: to_jsonable(getattr(obj, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(obj) if f.name not in exclude}


class JsonFields:
    """Mixin for a result whose JSON is its fields: ``to_dict()`` is :func:`fields_dict`, stamped with
    ``KIND`` when the class sets one (a top-level result)."""

    KIND: ClassVar[str | None] = None

    def to_dict(self) -> dict[str, Any]:
        d = fields_dict(self)
        return stamp(self.KIND, d) if self.KIND else d


def _required_args(fn) -> bool:
    try:
        return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
