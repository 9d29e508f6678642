"""What a checkpoint or adapter holds, as plain JSON-ready data (``lora-lens inspect``).

The schema is documented in ``docs/formats.md``. Reading an adapter loads its
(small) factors to validate them; reading a base lists names, shapes and dtypes
without reading tensor data.
"""

from __future__ import annotations

from pathlib import Path

from .data import resolve_model
from .io.base import BaseWeights, open_base
from .io.formats import detect, load_adapters
from .jsonable import stamp
from .keys import architecture_family, parse_module_path
from .types import Adapter


def is_adapter_path(path: str | Path, format: str | None = None) -> bool:
    """True for an adapter of any format (folder or file); False for a base checkpoint."""
    return detect(path, format) is not None


def describe_adapter(adapter: Adapter) -> dict:
    """One adapter as a JSON-ready dict: a record per LoRA module, other tensors, totals."""
    s = adapter.settings
    modules = [
        {
            "name": m.name,
            "kind": m.kind,
            "stored_as": m.stored_as or m.name,
            "block": m.key.block,
            "block_name": m.key.block_name,
            "module_type": m.key.module,
            "shape": list(m.shape),
            "base_shape": list(m.base_shape),
            "rank": m.rank,
            "alpha": m.alpha,
            "scaling": m.scaling,
            "dtype": str(m.dtype).replace("torch.", ""),
            "layout": m.layout,
            "kernel": list(m.kernel),
            "parameters": m.num_parameters,
        }
        for m in adapter.modules
    ]
    return stamp("adapter", {
        "format": adapter.format,
        "path": str(adapter.path),
        "adapter_name": adapter.adapter_name,
        "weights_file": str(adapter.weights_file) if adapter.weights_file else None,
        "peft_type": s.peft_type,
        "base_model_name_or_path": s.base_model_name_or_path,
        "family": architecture_family(adapter.names),
        "r": s.r,
        "lora_alpha": s.lora_alpha,
        "use_rslora": s.use_rslora,
        "use_dora": s.use_dora,
        "fan_in_fan_out": s.fan_in_fan_out,
        "rank_pattern": s.rank_pattern,
        "alpha_pattern": s.alpha_pattern,
        "delta_is_sBA": adapter.delta_is_sBA,
        "flags": list(adapter.flags),
        "metadata": adapter.metadata,
        "modules": modules,
        "other_tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in adapter.other_tensors],
        "totals": {
            "modules": len(adapter.modules),
            "module_types": adapter.module_types,
            "parameters": adapter.num_parameters,
            "bytes": adapter.num_bytes,
            "other_parameters": sum(t.numel for t in adapter.other_tensors),
        },
    })


def describe_base(base: BaseWeights) -> dict:
    """A base checkpoint as a JSON-ready dict: 2-D weights grouped by module type, totals."""
    groups = []
    for g in base.groups():
        blocks = [parse_module_path(t.name.removesuffix(".weight")).block for t in g.tensors]
        groups.append({
            "module_type": g.module,
            "count": len(g.tensors),
            "shapes": [list(s) for s in g.shapes],
            "dtypes": sorted({t.dtype for t in g.tensors}),
            "blocks": [b for b in blocks if b is not None],
        })
    return stamp("base", {
        "path": str(base.path),
        "format": base.format,
        "family": architecture_family([t.name for t in base.matrices()]),
        "groups": groups,
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in base.infos()],
        "totals": {"tensors": len(base.infos()), "parameters": base.num_parameters, "bytes": base.num_bytes},
    })


def inspect_path(path: str | Path, format: str | None = None) -> dict:
    """Describe an adapter (any format; ``format`` forces the reader) or a base checkpoint.

    An adapter folder with several named adapters gives
    ``{"kind": "adapters", "adapters": [...]}``. A bundled model's name (``stories260K``) names its folder.
    """
    path = resolve_model(path)
    if format is not None or is_adapter_path(path):
        adapters = load_adapters(path, format)
        if len(adapters) == 1:
            return describe_adapter(adapters[0])
        return stamp("adapters", {"path": str(path), "adapters": [describe_adapter(a) for a in adapters]})
    return describe_base(open_base(path))
