"""Pair an adapter's modules with the base weights they update, and read them in batches.

The base is read lazily: :func:`base_chunks` loads one chunk of one
``(m, n, r)`` group at a time, already in PyTorch's ``(m, n)`` layout
(Conv1D and Embedding weights are stored ``(n, m)`` and transposed here; a Conv
kernel ``(out, in, kh, kw)`` is flattened to ``(out, in·kh·kw)`` as PEFT's
factors are).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..decompose import Progress, chunk_size
from ..errors import ShapeError
from ..io.base import BaseWeights
from ..types import Adapter, LoraModule

#: Layouts whose base weight is stored as ``(n, m)``.
TRANSPOSED = ("conv1d", "embedding")
#: Default device budget (bytes) of one chunk in the compare stage: a 7B model's
#: 32 stacked 4096×11008 weights and their full SVDs would need ~50 GB at once.
#: ``None`` lifts the cap (one whole shape group per call).
DEFAULT_MAX_MEMORY = 4 << 30


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


def load_w0(base: BaseWeights, weight: str, layout: str) -> torch.Tensor:
    """One base weight as ``(m, n)`` in its stored dtype (NaN/Inf refused by ``base.get``)."""
    W = base.get(weight)
    if layout in TRANSPOSED:
        return W.T
    if W.dim() > 2:  # Conv kernel (out, in, kh, kw) → (m, n)
        return W.reshape(W.shape[0], -1)
    return W


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

    def delta(self) -> torch.Tensor:
        """``ΔW = s·B A`` materialized ``(L, m, n)``: only where the maths needs the full matrix."""
        return self.scaling[:, None, None] * (self.B @ self.A)


def base_chunks(
    modules: Sequence[LoraModule],
    weights: dict[str, str],
    base: BaseWeights,
    device: torch.device,
    dtype: torch.dtype,
    per_item_bytes: Callable[[int, int, int], int],
    max_memory: int | None = DEFAULT_MAX_MEMORY,
    progress: Progress | None = None,
    what: str = "",
) -> Iterator[Chunk]:
    """Yield :class:`Chunk` s grouped by ``(m, n, r)``; one chunk's base weights in memory at a time.

    ``per_item_bytes(m, n, r)`` is what one module costs on the device; with
    ``max_memory`` (bytes) chunks are cut to fit. ``progress(done, total, what)``
    is called once the consumer is done with each chunk.
    """
    done = 0
    groups: OrderedDict[tuple, list[LoraModule]] = OrderedDict()
    for m in modules:
        groups.setdefault((m.shape, m.rank), []).append(m)
    for ((m, n), r), group in groups.items():
        step = chunk_size(per_item_bytes(m, n, r), max_memory, len(group))
        for lo in range(0, len(group), step):
            part = group[lo: lo + step]
            W0 = torch.stack([load_w0(base, weights[g.name], g.layout).to(dtype) for g in part]).to(device)
            yield Chunk(
                modules=tuple(part),
                weights=tuple(weights[g.name] for g in part),
                W0=W0,  # (L, m, n)
                B=torch.stack([g.B for g in part]).to(device, dtype),  # (L, m, r)
                A=torch.stack([g.A for g in part]).to(device, dtype),  # (L, r, n)
                scaling=torch.tensor([g.scaling for g in part], dtype=dtype, device=device),  # (L,)
            )
            done += len(part)
            if progress:
                progress(done, len(modules), f"{what} {m}x{n} r={r}".strip())
