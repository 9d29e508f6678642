"""How ΔW relates to W0 (LoRA paper §7.3, docs/maths.md §3).

With ``U_r (m, r)``, ``V_r (n, r)`` the top-r singular vectors of ``ΔW`` (factored,
never formed) and ``W0 (m, n)`` in PyTorch's layout:

- ``proj_delta = ‖U_rᵀ W0 V_r‖_F``: how much of W0 lives in ΔW's directions;
- ``proj_w0 = ‖U0_rᵀ W0 V0_r‖_F = (Σ_{i≤r} σ_i(W0)²)^{1/2}``: the same for W0's own top-r
  directions (the ceiling);
- ``proj_random``: the same for Haar-random orthonormal ``U (m, r)``, ``V (n, r)`` (seeded, mean of ``draws``);
  its expectation is ``‖W0‖_F · r / √(m n)``;
- ``amplification = ‖ΔW‖_F / proj_delta``: large when ΔW amplifies directions
  that W0 barely uses (the paper: ≈ 21.5 for GPT-3 Wq at r=4, ≈ 2 at r=64).

``proj_delta`` between ``proj_random`` and ``proj_w0`` tells whether the update
reuses W0's strong directions (near ``proj_w0``) or ones W0 hardly has (near
``proj_random``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compute import Compute, as_compute
from ..io.base import BaseWeights
from ..io.layout import with_base_layouts
from ..jsonable import stamp
from ..linalg import factored_svd, random_orthonormal, randomized_svd
from ..precision import full_fp32
from ..types import Adapter, LayerKey
from .pairing import Chunk, base_chunks, pair_with_base
from .serialize import in_layer_order, key_fields, num

#: Random (U, V) pairs averaged for ``proj_random``.
DRAWS = 8
#: randomized_svd's default oversampling (it is exact when ``r + 16 ≥ min(m, n)``).
RANDOMIZED_OVERSAMPLE = 16


@full_fp32
def projection_norm(U: torch.Tensor, W0: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """``‖Uᵀ W0 V‖_F`` for ``U (..., m, r)``, ``W0 (..., m, n)``, ``Vh = Vᵀ (..., r, n)``: ``(...)``."""
    return torch.linalg.matrix_norm(U.transpose(-1, -2) @ W0 @ Vh.transpose(-1, -2))  # (..., r, r) → (...)


def random_projection_norm(W0: torch.Tensor, r: int, draws: int = DRAWS, seed: int = 0) -> torch.Tensor:
    """Mean over ``draws`` of ``‖Uᵀ W0 V‖_F`` for Haar-random ``U (m, r)``, ``V (n, r)``.

    ``W0 (L, m, n)`` → ``(L,)``. Every module of the chunk sees the same
    ``draws`` pairs (a baseline needs no independence across modules, and this
    keeps the random bases at ``draws·(m + n)·r`` numbers). One module at a
    time: a product broadcast over the chunk is blocked differently for each
    chunk size, and the numbers must not depend on ``max_memory``.
    """
    L, m, n = W0.shape
    U = random_orthonormal(m, r, batch=(draws,), seed=seed, dtype=W0.dtype).to(W0.device)  # (draws, m, r)
    Vh = random_orthonormal(n, r, batch=(draws,), seed=seed + 1, dtype=W0.dtype).to(W0.device).transpose(-1, -2)
    return torch.stack([projection_norm(U, W, Vh).mean(0) for W in W0])  # (draws,) per module → (L,)


@dataclass(frozen=True)
class ModuleAlignment:
    """§7.3 numbers for one module (norms are Frobenius)."""

    name: str
    key: LayerKey
    weight: str
    rank: int
    delta_norm: float
    w0_norm: float
    proj_delta: float
    proj_w0: float
    proj_random: float

    @property
    def amplification(self) -> float:
        return self.delta_norm / self.proj_delta if self.proj_delta > 0 else float("inf")

    def to_dict(self) -> dict:
        # reshaped: the key as block/module type, the amplification factor added
        return {
            "name": self.name, **key_fields(self.key), "weight": self.weight, "rank": self.rank,
            "delta_norm": num(self.delta_norm), "w0_norm": num(self.w0_norm), "proj_delta": num(self.proj_delta),
            "proj_w0": num(self.proj_w0), "proj_random": num(self.proj_random),
            "amplification": num(self.amplification),
        }


@dataclass(frozen=True)
class Alignment:
    """:func:`alignment`'s result, modules in layer order."""

    adapter: str
    path: str
    base: str
    modules: tuple[ModuleAlignment, ...]
    draws: int
    seed: int
    w0_exact: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        # reshaped: draws and seed grouped under "random"
        return stamp("alignment", {
            "adapter": self.adapter, "path": self.path, "base": self.base,
            "random": {"draws": self.draws, "seed": self.seed}, "w0_singular_values_exact": self.w0_exact,
            "notes": list(self.notes), "modules": [m.to_dict() for m in self.modules],
        })


def align_chunk(chunk: Chunk, compute: Compute, w0_sigma: torch.Tensor | None = None,
                draws: int = DRAWS) -> list[ModuleAlignment]:
    """§7.3 for one chunk of same-shaped modules.

    ``w0_sigma (L, ≥r)``: W0's top singular values when already known (an exact
    SVD done for intruder dimensions); else the randomized range finder gives
    them, its sketch seeded per weight name (the same numbers for any chunking).
    """
    W0 = chunk.W0  # (L, m, n)
    r = chunk.A.shape[-2]
    U, S, Vh = factored_svd(chunk.B, chunk.A, chunk.scaling)  # (L, m, r), (L, r), (L, r, n)
    if w0_sigma is None:
        # W0 is stacked in the compute dtype (pairing.base_chunks), so no half passes: asking for them
        # (compute.half_passes=True) on a float32 stack is refused by the finder
        w0_sigma = randomized_svd(W0, r, seed=compute.seeds_for(chunk.weights))[1]  # (L, r)
    cols = {
        "delta_norm": torch.linalg.vector_norm(S, dim=-1),
        "w0_norm": torch.linalg.matrix_norm(W0),
        "proj_delta": projection_norm(U, W0, Vh),
        "proj_w0": torch.linalg.vector_norm(w0_sigma[:, :r], dim=-1),
        "proj_random": random_projection_norm(W0, r, draws, compute.seed),
    }
    cols = {k: v.cpu().tolist() for k, v in cols.items()}
    return [
        ModuleAlignment(m.name, m.key, w, m.rank, **{k: float(v[i]) for k, v in cols.items()})
        for i, (m, w) in enumerate(zip(chunk.modules, chunk.weights))
    ]


def alignment(
    adapter: Adapter,
    base: BaseWeights,
    *,
    draws: int = DRAWS,
    exact_w0: bool = False,
    compute: Compute | None = None,
    **options,
) -> Alignment:
    """LoRA §7.3 per module: projection norms of W0 on ΔW's, W0's own and random directions.

    Base weights are read lazily, one ``(m, n, r)`` chunk at a time (Conv1D /
    Embedding weights transposed to ``(m, n)``); W0's top-r singular values come
    from the randomized range finder (exact when ``r + 16 ≥ min(m, n)``), or
    from ``torch.linalg.svdvals`` with ``exact_w0=True``.
    """
    cx = as_compute(compute, **options)
    adapter = with_base_layouts(adapter, base)  # Linear vs Conv1D per module, as PEFT decides
    weights = pair_with_base(adapter, base)
    itemsize = cx.itemsize
    rows, exact = [], True

    def per_item(m: int, n: int, r: int) -> int:  # W0 + workspace, Uᵀ W0 per draw, range-finder sketches
        return (3 * m * n + draws * r * n + 4 * (m + n) * (r + RANDOMIZED_OVERSAMPLE)) * itemsize

    for chunk in base_chunks(list(adapter), weights, base, cx, per_item, "alignment"):
        m, n = chunk.W0.shape[-2:]
        sigma = torch.linalg.svdvals(chunk.W0) if exact_w0 else None
        rows += align_chunk(chunk, cx, sigma, draws)
        # randomized_svd falls back to the exact SVD when r + oversample reaches min(m, n)
        exact &= exact_w0 or chunk.A.shape[-2] + RANDOMIZED_OVERSAMPLE >= min(m, n)
    return Alignment(adapter.label, str(adapter.path), str(base.path), in_layer_order(rows), draws, cx.seed, exact,
                     tuple(adapter.flags) + zero_delta_notes(rows))


def zero_delta_notes(rows: list[ModuleAlignment]) -> tuple[str, ...]:
    """A warning when some ΔW are zero (B = 0, untrained): their 'top-r directions' are arbitrary."""
    zero = [r.name for r in rows if r.delta_norm == 0]
    if not zero:
        return ()
    return (f"{len(zero)} module(s) have ΔW = 0 (B = 0, untrained?), e.g. {zero[0]}: their top-r directions are "
            "arbitrary, so their proj ΔW and amplification mean nothing.",)

