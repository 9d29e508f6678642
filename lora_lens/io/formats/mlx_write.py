"""Write MLX-LM adapter folders: ``OUT/adapters.safetensors`` + ``OUT/adapter_config.json`` (what :mod:`.mlx` reads).

MLX-LM (``mlx_lm/tuner/lora.py``, ``LoRALinear``) computes
``y = x W0ᵀ + scale · (x · lora_a) · lora_b`` with ``lora_a (in, r)`` and
``lora_b (r, out)``, one ``rank`` and one ``scale`` for every layer
(``tuner/utils.py``: ``linear_to_lora_layers`` builds each layer from
``lora_parameters``). So, for ``ΔW = s_i · B_i A_i``:

- ``lora_a = A_iᵀ``, ``lora_b = (s_i / scale) · B_iᵀ`` with ``scale`` the
  modal nonzero module scale: a module whose scale differs carries the ratio in its
  ``lora_b`` (exact up to one rounding in the output dtype, none when the
  ratio is 1 or a power of two);
- ranks below the largest are padded with zero rows / columns, which adds
  nothing to ``lora_a · lora_b``.

The config has the fields ``load_adapters`` reads: ``fine_tune_type: "lora"``,
``num_layers: -1`` (every layer, ``model.layers[-0:]``; a layer the file has
no weights for keeps ``lora_b = 0``, no update) and ``lora_parameters``
``{rank, scale, dropout, keys}``, ``keys`` being the module paths inside a
layer (``self_attn.q_proj``) and the full paths of modules outside the
layers (``lm_head``). Module paths are written as read: MLX-LM uses the
Hugging Face paths for Llama-family models.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ConfigError, NonFiniteError
from ...types import Adapter
from ..atomic import atomic_directory, atomic_save_safetensors, atomic_write_json
from .mlx import CONFIG_NAME, WEIGHT_NAMES
from .write_common import SUPPORTED, check_names, component_paths, modal, out_factors, provenance


def write(adapter: Adapter, out: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` as an MLX-LM adapter folder ``out``; returns ``[out]``."""
    for m, (component, _) in zip(adapter.modules, component_paths(adapter)):
        if m.layout == "conv":
            raise ConfigError(f"'{m.name}': a Conv2d update; MLX-LM adapts Linear and Embedding layers only. "
                              f"{SUPPORTED}")
        if component is not None:
            raise ConfigError(f"'{m.name}': a diffusion pipeline module; MLX-LM adapters hold language-model "
                              f"layers only. {SUPPORTED}")
    # the modal nonzero scale: a module at scale 0 (lora_alpha 0) folds a zero ratio into lora_b, while a zero
    # global scale would leave the others nothing to fold into (s_i / 0)
    nonzero = [m.scaling for m in adapter.modules if m.scaling != 0]
    scale = float(modal(nonzero)) if nonzero else 0.0
    rank = max(m.rank for m in adapter.modules)
    tensors: dict[str, torch.Tensor] = {}
    keys = {}
    for m in adapter.modules:
        out_dtype = dtype or m.A.dtype
        A, B = out_factors(m, out_dtype)
        if m.scaling != scale:  # one global scale: the ratio goes into lora_b, one rounding from float64
            B = (m.B.double() * (m.scaling / scale)).to(out_dtype)
            _check_folded(m.name, B)
        A, B = _padded(A, B, rank)
        tensors[f"{m.name}.lora_a"] = A.T.contiguous()
        tensors[f"{m.name}.lora_b"] = B.T.contiguous()
        keys[m.key.module if m.key.block is not None else m.name] = None
    check_names(out, list(tensors), "MLX")
    config = {
        "fine_tune_type": "lora",
        "num_layers": -1,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    with atomic_directory(out, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, tmp / WEIGHT_NAMES[0], provenance(adapter))
        atomic_write_json(tmp / CONFIG_NAME, config)
    return [out]


def _padded(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (rank, n)``, ``B (m, rank)``: zero rows / columns added; ``B A`` is unchanged."""
    r = A.shape[0]
    if r == rank:
        return A, B
    return (torch.cat([A, A.new_zeros(rank - r, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], rank - r)], 1))


def _check_folded(name: str, B: torch.Tensor) -> None:
    """A factor whose folded scale ratio overflows the dtype: refused (never written)."""
    if not bool(torch.isfinite(B).all()):
        raise NonFiniteError(f"'{name}': lora_b overflows {B.dtype} once its scale ratio is folded in; nothing was "
                             "written. Write a wider dtype (--save-dtype).")
