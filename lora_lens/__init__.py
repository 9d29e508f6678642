"""lora_lens: look inside LoRA adapters and start training from better weights.

The public API, in data-flow order: load (``open_base``, ``load_adapter``),
inspect (``inspect_path``), decompose, compare, methods, train, report.

The names below are imported on first use (PEP 562 ``__getattr__``): importing
``lora_lens`` or a light submodule (``lora_lens.errors``) does not import
torch, so ``lora-lens --help`` stays fast. ``from lora_lens import load_adapter``
works as usual.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name → the submodule that defines it
_LAZY = {
    **dict.fromkeys(["CheckpointError", "ConfigError", "DiskFullError", "KeyMatchError", "LoraLensError",
                     "NonFiniteError", "ShapeError", "UnsafeFileError"], ".errors"),
    **dict.fromkeys(["Analysis", "analyze_adapters"], ".analysis"),
    "Compute": ".compute",
    "adapter_spectra": ".spectra",
    **dict.fromkeys(["WorkerDiedError", "dask_mapper"], ".dist"),
    "inspect_path": ".inspect",
    "run_demo": ".demo",
    **dict.fromkeys(["stamp", "to_jsonable"], ".jsonable"),
    **dict.fromkeys(["load_adapter", "load_adapters", "open_base", "save_peft_adapter"], ".io"),
    "parse_module_path": ".keys",
    **dict.fromkeys(["Adapter", "LayerKey", "LoraModule", "LoraSettings", "TensorInfo"], ".types"),
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
