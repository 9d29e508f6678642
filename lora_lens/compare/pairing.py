"""Pair an adapter's modules with the base weights they update, and read them in batches.

The base is read lazily: :func:`base_chunks` loads one chunk of one
``(m, n, r)`` group at a time, already in PyTorch's ``(m, n)`` layout
(:func:`lora_lens.chunks.load_w0`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..chunks import chunks, load_w0, stack
from ..compute import Compute
from ..errors import ShapeError
from ..io.base import BaseWeights
from ..precision import full_fp32
from ..types import Adapter, LoraModule


def pair_with_base(modules: Adapter | Sequence[LoraModule], base: BaseWeights) -> dict[str, str]:
    """``{module name: base weight name}``, with every shape checked.

    Names are matched by :meth:`BaseWeights.weight_names_for` (backbone prefixes
    such as ``bert.`` bridged; a module absent from the base → ``KeyMatchError``).
    A base weight whose shape does not fit the module's ``ΔW`` (in the base's
    stored layout) → one ``ShapeError`` with the count and the first three pairs, both tensors named.
    """
    modules = list(modules)
    weights = base.weight_names_for([m.name for m in modules])
    bad = []
    for m in modules:
        info = base.info(weights[m.name])
        if not _fits(m, info.shape):
            bad.append(f"'{m.name}' ΔW {m.shape[0]}x{m.shape[1]} (stored as {'x'.join(map(str, m.base_shape))}, "
                       f"layout {m.layout}) vs base tensor '{info.name}' {'x'.join(map(str, info.shape))}")
    if bad:
        raise ShapeError(
            f"{len(bad)} adapter module(s) do not fit the base {base.path}: {'; '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''}. Check that --base is the model this adapter was trained on."
        )
    return weights


def _fits(m: LoraModule, shape: tuple[int, ...]) -> bool:
    if m.layout == "conv" and len(shape) > 2:
        return shape[0] == m.shape[0] and _numel(shape[1:]) == m.shape[1]
    return tuple(shape) == m.base_shape


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True, eq=False)
class Chunk:
    """Same-shaped modules and their base weights, stacked on the compute device.

    ``W0 (L, m, n)``, ``B (L, m, r)``, ``A (L, r, n)``, ``scaling (L,)``.
    """

    modules: tuple[LoraModule, ...]
    weights: tuple[str, ...]
    W0: torch.Tensor
    B: torch.Tensor
    A: torch.Tensor
    scaling: torch.Tensor

    @full_fp32
    def delta(self) -> torch.Tensor:
        """``ΔW = s·B A`` materialized ``(L, m, n)``: only where the maths needs the full matrix."""
        return self.scaling[:, None, None] * (self.B @ self.A)


def base_chunks(
    modules: Sequence[LoraModule],
    weights: dict[str, str],
    base: BaseWeights,
    compute: Compute,
    per_item_bytes: Callable[[int, int, int], int],
    what: str = "",
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s grouped by ``(m, n, r)``; one chunk's base weights in memory at a time.

    ``per_item_bytes(m, n, r)`` is what one module costs on the device; chunks
    are cut to fit ``compute.max_memory`` (:func:`lora_lens.chunks.chunks`),
    which also reports progress once the consumer is done with each chunk.
    """
    for _, part in chunks(modules, lambda g: (g.shape, g.rank), lambda key: per_item_bytes(*key[0], key[1]), compute,
                          lambda key: f"{what} {key[0][0]}x{key[0][1]} r={key[1]}".strip()):
        yield Chunk(
            modules=tuple(part),
            weights=tuple(weights[g.name] for g in part),
            W0=stack(compute, part, lambda g: load_w0(base, weights[g.name], g.layout)),  # (L, m, n)
            B=stack(compute, part, lambda g: g.B),  # (L, m, r)
            A=stack(compute, part, lambda g: g.A),  # (L, r, n)
            scaling=torch.tensor([g.scaling for g in part], dtype=compute.dtype, device=compute.device),  # (L,)
        )
