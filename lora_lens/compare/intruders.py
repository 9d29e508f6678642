"""Intruder dimensions (docs/maths.md §4).

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence".

With ``x_i`` the left singular vectors of ``W0 (m, n)`` and ``y_j`` those of the
merged weight ``W0 + ΔW``:

    m_j = max_i |cos(y_j, x_i)|   for the top-k  y_j   (k = 10 by default),

and ``y_j`` is an *intruder* when ``m_j < ε`` (ε = 0.5 by default): a
high-ranking direction of the fine-tuned weight that resembles no direction of
the pre-trained one. Counted per module and summed; a sweep of ε reuses the
same SVDs.

The maths needs the full matrices, so here (only here) ΔW is materialized, one
chunk of same-shaped modules at a time, and ``W0`` and ``W0 + ΔW`` go through
one batched SVD. ``x_i`` ranges over the ``min(m, n)`` singular vectors of the
thin SVD, as the authors' code does (``full_matrices=False``). [ours] Layout is
PyTorch's ``(m, n)`` (output space) for every module; a GPT-2 Conv1D weight is
transposed first, where code working on the stored tensor would compare input-space vectors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..compute import Compute, as_compute
from ..errors import ConfigError
from ..io.base import BaseWeights
from ..io.layout import with_base_layouts
from ..jsonable import stamp
from ..linalg import svd
from ..precision import full_fp32
from ..types import Adapter, LayerKey
from .pairing import Chunk, base_chunks, pair_with_base
from .serialize import as_list, in_layer_order, key_fields

K = 10
EPSILON = 0.5


@full_fp32
def max_cosines(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``m_j = max_i |x_iᵀ y_j|`` for unit columns ``X (..., m, p)``, ``Y (..., m, k)``: ``(..., k)``."""
    return (Y.transpose(-1, -2) @ X).abs().amax(dim=-1)  # (..., k, p) → (..., k)


def merged_svd(W0: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left singular vectors of ``W0`` and ``W0 + ΔW`` in one batched SVD, and σ(W0).

    ``W0, delta (L, m, n)`` → ``X (L, m, p)``, ``Y (L, m, p)``, ``S0 (L, p)``, ``p = min(m, n)``.
    """
    L = W0.shape[0]
    U, S, _ = svd(torch.cat([W0, W0 + delta]), fix_signs=False)  # (2L, m, p), (2L, p): |cos| needs no sign fix
    return U[:L], U[L:], S[:L]


def check_params(k: int, epsilon: float | Sequence[float]) -> tuple[float, ...]:
    eps = (epsilon,) if isinstance(epsilon, (int, float)) else tuple(epsilon)
    if not eps:
        raise ConfigError("no epsilon given; expected one or more thresholds in (0, 1].")
    bad = [e for e in eps if not 0 < e <= 1]
    if bad:
        raise ConfigError(f"epsilon {bad[0]} is out of range; expected cosine thresholds in (0, 1] "
                          f"(default {EPSILON}).")
    if k < 1:
        raise ConfigError(f"intruder k={k}; expected a positive number of top singular vectors (default {K}).")
    return tuple(float(e) for e in eps)


@dataclass(frozen=True)
class ModuleIntruders:
    """``max_cos[j] = m_j`` for the top-k singular vectors of ``W0 + ΔW``; ``counts`` per ε."""

    name: str
    key: LayerKey
    weight: str
    max_cos: tuple[float, ...]
    epsilons: tuple[float, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(sum(c < e for c in self.max_cos) for e in self.epsilons)

    def to_dict(self) -> dict:
        # reshaped: the key as block/module type, counts per ε derived from max_cos
        return {"name": self.name, **key_fields(self.key), "weight": self.weight, "k": len(self.max_cos),
                "max_cos": list(self.max_cos), "counts": list(self.counts)}


@dataclass(frozen=True)
class Intruders:
    """:func:`intruder_dimensions`' result; ``counts``/``totals`` follow ``epsilons``."""

    adapter: str
    path: str
    base: str
    k: int
    epsilons: tuple[float, ...]
    modules: tuple[ModuleIntruders, ...]
    notes: tuple[str, ...] = ()

    @property
    def totals(self) -> tuple[int, ...]:
        return tuple(sum(m.counts[i] for m in self.modules) for i in range(len(self.epsilons)))

    def to_dict(self) -> dict:
        # reshaped: totals per ε added, modules through their own to_dict
        return stamp("intruders", {"adapter": self.adapter, "path": self.path, "base": self.base, "k": self.k,
                                   "epsilons": list(self.epsilons), "totals": list(self.totals),
                                   "notes": list(self.notes), "modules": [m.to_dict() for m in self.modules]})


def intruder_chunk(chunk: Chunk, k: int, epsilons: tuple[float, ...]) -> tuple[list[ModuleIntruders], torch.Tensor]:
    """Intruder scores of one chunk; also returns σ(W0) ``(L, p)`` for reuse (alignment)."""
    X, Y, S0 = merged_svd(chunk.W0, chunk.delta())
    kk = min(k, Y.shape[-1])
    scores = as_list(max_cosines(X, Y[..., :kk]))  # (L, k)
    rows = [ModuleIntruders(m.name, m.key, w, tuple(scores[i]), epsilons)
            for i, (m, w) in enumerate(zip(chunk.modules, chunk.weights))]
    return rows, S0


def intruder_bytes(itemsize: int):
    """Device bytes per module: W0, ΔW, the stacked pair, U, Vh and LAPACK workspace."""
    return lambda m, n, r: (8 * m * n + 4 * (m + n) * min(m, n)) * itemsize


def intruder_dimensions(
    adapter: Adapter,
    base: BaseWeights,
    *,
    k: int = K,
    epsilon: float | Sequence[float] = EPSILON,
    compute: Compute | None = None,
    **options,
) -> Intruders:
    """Count intruder dimensions per module (and in total) for each ε.

    One batched full SVD of ``[W0; W0 + ΔW]`` per chunk of same-shaped
    modules; the base is read lazily, one chunk at a time.
    """
    eps = check_params(k, epsilon)
    cx = as_compute(compute, **options)
    adapter = with_base_layouts(adapter, base)  # Linear vs Conv1D per module, as PEFT decides
    weights = pair_with_base(adapter, base)
    rows = []
    for chunk in base_chunks(list(adapter), weights, base, cx, intruder_bytes(cx.itemsize), "intruders"):
        rows += intruder_chunk(chunk, k, eps)[0]
    return Intruders(adapter.label, str(adapter.path), str(base.path), k, eps, in_layer_order(rows),
                     tuple(adapter.flags))
