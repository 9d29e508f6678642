"""Readers and writers: safetensors (single, sharded), weights-only pickles, adapters of every format
(PEFT, MLX, kohya, LyCORIS, diffusers, research state dicts: :mod:`.formats`), atomic writes;
:func:`write_adapter` writes PEFT, kohya, MLX-LM and diffusers."""

from .atomic import atomic_directory, atomic_save_safetensors, atomic_write_json, atomic_write_text, check_destination
from .base import BaseWeights, WeightGroup, open_base
from .convert import convert_to_peft, load_convertible
from .formats import FORMATS, detect, load_adapter, load_adapters
from .peft import (
    find_adapters,
    lora_scaling,
    rank_and_alpha,
    read_settings,
    save_peft_adapter,
)
from .tensors import TensorStore, check_tensor, open_tensor_file
from .write import WRITE_FORMATS, write_adapter

__all__ = [
    "FORMATS", "detect", "BaseWeights", "TensorStore", "WeightGroup", "atomic_directory", "atomic_save_safetensors",
    "atomic_write_json", "atomic_write_text", "check_destination", "check_tensor", "convert_to_peft", "find_adapters", "load_adapter",
    "load_adapters", "lora_scaling", "open_base", "open_tensor_file", "rank_and_alpha",
    "read_settings", "save_peft_adapter", "WRITE_FORMATS", "write_adapter", "load_convertible",
]

from .initfile import INIT_NAME, THETA_NAME, InitDescription, read_init_description, write_init_description  # noqa: E402

__all__ += ["INIT_NAME", "THETA_NAME", "InitDescription", "read_init_description", "write_init_description"]
