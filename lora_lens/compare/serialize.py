"""JSON-ready numbers: tensors → nested lists, NaN/Inf → ``None`` (JSON has no NaN)."""

from __future__ import annotations

import math

import torch


def num(x: float | torch.Tensor | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def as_list(t: torch.Tensor) -> list | float | None:
    """A tensor → nested Python lists of floats, non-finite → ``None``."""
    return _clean(t.detach().cpu().double().tolist())


def _clean(x):
    return [_clean(v) for v in x] if isinstance(x, list) else num(x)


def key_fields(key) -> dict:
    """A module's place: block index (``None`` outside the blocks), its readable name where the index is a
    position code (diffusion UNets: ``unet.up_blocks.1.attentions.0``; else ``None``) and module type."""
    return {"block": key.block, "block_name": key.block_name, "module_type": key.module}


def in_layer_order(items) -> tuple:
    """Results sorted by their ``key`` (prefix, block, module type): layer order."""
    return tuple(sorted(items, key=lambda x: x.key.sort_key()))
