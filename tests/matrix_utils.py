"""Matrices with a known SVD for the linear-algebra tests (the range finder on the CPU and on CUDA).

Test modules import these from here, never from each other.
"""

from __future__ import annotations

import torch

from lora_lens.linalg import random_orthonormal


def planted(m: int, n: int, sig: torch.Tensor, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``U diag(sig) Vᵀ (m, n)`` with Haar-random singular vectors, built in float64 and cast to ``dtype``."""
    k = sig.numel()
    U = random_orthonormal(m, k, seed=seed, dtype=torch.float64)
    V = random_orthonormal(n, k, seed=seed + 1, dtype=torch.float64)
    return ((U * sig) @ V.T).to(dtype)
