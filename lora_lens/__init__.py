"""lora_lens: look inside LoRA adapters and start training from better weights.

The public API, in data-flow order: load (``open_base``, ``load_adapter``),
inspect (``inspect_path``), decompose, compare, methods, train, report.
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DiskFullError,
    KeyMatchError,
    LoraLensError,
    NonFiniteError,
    ShapeError,
    UnsafeFileError,
)
from .inspect import inspect_path  # noqa: E402
from .io import load_adapter, load_adapters, open_base, save_peft_adapter  # noqa: E402
from .keys import parse_module_path  # noqa: E402
from .types import Adapter, LayerKey, LoraModule, LoraSettings, TensorInfo  # noqa: E402

__all__ = [
    "Adapter", "CheckpointError", "ConfigError", "DiskFullError", "KeyMatchError", "LayerKey", "LoraLensError",
    "LoraModule", "LoraSettings", "NonFiniteError", "ShapeError", "TensorInfo", "UnsafeFileError",
    "__version__", "inspect_path", "load_adapter", "load_adapters", "open_base", "parse_module_path",
    "save_peft_adapter",
]
