"""Helpers the compare results' ``to_dict`` share: floats and float tensors through
:func:`lora_lens.jsonable.to_jsonable` (the one converter; NaN/Inf → ``None``), a module's place, layer order."""

from __future__ import annotations

import torch

from ..jsonable import to_jsonable


def num(x: float | torch.Tensor | None) -> float | None:
    """A number as a JSON float (ints and 0-d tensors too), non-finite → ``None``."""
    return None if x is None else to_jsonable(float(x))


def as_list(t: torch.Tensor) -> list | float | None:
    """A tensor → nested Python lists of floats (whatever its dtype), non-finite → ``None``."""
    return to_jsonable(t.detach().double())


def key_fields(key) -> dict:
    """A module's place: block index (``None`` outside the blocks), its readable name where the index is a
    position code (diffusion UNets: ``unet.up_blocks.1.attentions.0``; else ``None``) and module type."""
    return {"block": key.block, "block_name": key.block_name, "module_type": key.module}


def in_layer_order(items) -> tuple:
    """Results sorted by their ``key`` (prefix, block, module type): layer order."""
    return tuple(sorted(items, key=lambda x: x.key.sort_key()))
