"""Random baselines: what φ and principal angles look like for unrelated subspaces.

Every similarity number is shown beside the same number for Haar-random
subspaces of the same dimensions (sampled, seeded, averaged over ``draws``)
and, for φ, the analytic expectation for independent uniformly random
subspaces of dims ``i`` and ``j`` in ``R^d`` (docs/maths.md §2):

    E[φ(i, j)] = E‖U_iᵀ U_j‖_F² / min(i, j) = (i·j/d) / min(i, j) = max(i, j) / d.

A φ near the baseline means "no more overlap than chance".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..linalg import phi_grid, principal_angles, random_orthonormal

#: Random draws averaged for each baseline (cheap: two ``d × k`` QRs per draw).
DRAWS = 16


def expected_phi_grid(r1: int, r2: int, d: int) -> torch.Tensor:
    """``max(i, j) / d`` for ``i ≤ r1``, ``j ≤ r2``: ``(r1, r2)`` float64."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return torch.maximum(i, j) / d


def sampled_phi_grid(d: int, k_a: int, k_b: int, draws: int = DRAWS, seed: int = 0,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """φ(i, j) of independent Haar-random subspaces of ``R^d``, for every ``i ≤ k_a``, ``j ≤ k_b``.

    The first ``i`` columns of a Haar-random ``(d, k_a)`` basis are Haar-random
    of dim ``i``, so one pair of bases per draw gives the whole grid. Returns the
    mean grid ``(k_a, k_b)`` float64 and the bases ``(draws, d, k_a)``, ``(draws, d, k_b)``.
    """
    Ua = random_orthonormal(d, k_a, batch=(draws,), seed=seed, dtype=dtype).to(device)  # (draws, d, k_a)
    Ub = random_orthonormal(d, k_b, batch=(draws,), seed=seed + 1, dtype=dtype).to(device)  # (draws, d, k_b)
    return phi_grid(Ua, Ub).mean(0).cpu().double(), Ua, Ub


def layer_baseline(d: int, ks: Sequence[int], draws: int = DRAWS, seed: int = 0,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Baselines for an ``L × L`` φ grid of subspaces of dims ``ks`` in ``R^d``.

    Returns ``(sampled, expected)``, both ``(L, L)`` float64: the mean over
    ``draws`` of φ between two independent Haar-random subspaces of dims
    ``k_a``, ``k_b``, and ``max(k_a, k_b) / d``. The diagonal holds the same
    quantities (two independent subspaces of that layer's dim), not 1.
    """
    ks = list(ks)
    kmax = max(ks)
    table = sampled_phi_grid(d, kmax, kmax, draws, seed, device, dtype)[0]  # (kmax, kmax)
    idx = torch.tensor(ks) - 1
    sampled = table[idx[:, None], idx[None, :]]
    kt = torch.tensor(ks, dtype=torch.float64)
    return sampled, torch.maximum(kt[:, None], kt[None, :]) / d


@dataclass(frozen=True, eq=False)
class PairBaseline:
    """Random baseline for comparing a ``k_a``-dim and a ``k_b``-dim subspace of ``R^d``.

    ``grid (k_a, k_b)``: sampled mean of φ(i, j); ``expected_grid``: ``max(i, j)/d``;
    ``angles_deg (min(k_a, k_b),)``: mean principal angles (ascending);
    ``grassmann``: mean ``‖θ‖₂`` (radians).
    """

    dim: int
    k_a: int
    k_b: int
    grid: torch.Tensor
    expected_grid: torch.Tensor
    angles_deg: torch.Tensor
    grassmann: float
    draws: int

    @property
    def phi(self) -> float:
        """Sampled φ at ``i = j = min(k_a, k_b)``."""
        m = min(self.k_a, self.k_b)
        return float(self.grid[m - 1, m - 1])

    @property
    def expected_phi(self) -> float:
        """``min(k_a, k_b)/d`` (for ``side='both'``, the mean over both sides' ``d``)."""
        m = min(self.k_a, self.k_b)
        return float(self.expected_grid[m - 1, m - 1])

    @property
    def phi_full(self) -> float:
        return float(self.grid[-1, -1])

    @property
    def expected_phi_full(self) -> float:
        return float(self.expected_grid[-1, -1])


def pair_baseline(d: int, k_a: int, k_b: int, draws: int = DRAWS, seed: int = 0,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> PairBaseline:
    """Sampled and expected baselines for :func:`~lora_lens.compare.adapter_similarity`."""
    grid, Ua, Ub = sampled_phi_grid(d, k_a, k_b, draws, seed, device, dtype)
    theta = principal_angles(Ua, Ub)  # (draws, min(k_a, k_b))
    return PairBaseline(
        dim=d, k_a=k_a, k_b=k_b,
        grid=grid,
        expected_grid=expected_phi_grid(k_a, k_b, d),
        angles_deg=torch.rad2deg(theta).mean(0).cpu().double(),
        grassmann=float(torch.linalg.vector_norm(theta, dim=-1).mean()),
        draws=draws,
    )


#: The one definition of "the deeper half" of ``L`` layers, as every summary and report states it.
DEEPER_HALF = "the last ⌈L/2⌉ layers (positions ≥ ⌊L/2⌋ in layer order; for odd L the middle layer counts as deep)"


def deeper_half(L: int) -> list[int]:
    """Positions (0-based, layer order) of the deeper half of ``L`` layers: :data:`DEEPER_HALF`."""
    return list(range(L // 2, L))


def nan_mean(x: torch.Tensor) -> float:
    """Mean ignoring NaN; NaN when nothing is left."""
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan
