"""Tolerances derived from the arithmetic, so that a comparison means the same on every CPU.

A tolerance tuned on one machine fails on the next one whose BLAS blocks its sums differently (CI once failed
on an Intel Xeon by 1.06e-5 against a hand-picked 1e-5). Every float comparison in the tests uses one of these.

Notation (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., §2–3): ``u`` is the unit
round-off (2⁻²⁴ in float32, 2⁻⁵³ in float64) and ``γ_n = n·u / (1 − n·u)``. A computed inner product of
length n satisfies ``|fl(xᵀy) − xᵀy| ≤ γ_n · |x|ᵀ|y|`` **whatever order the sum is taken in** (blocking,
threads, SIMD width), so a bound built from γ_n holds on every machine; a product of matrices
``X1 X2 … Xk`` with inner dimensions n1 … n(k−1) obeys the same with ``γ_{n1+…}`` and ``|X1||X2|…|Xk|``.
"""

from __future__ import annotations

import torch

U32 = torch.finfo(torch.float32).eps / 2  # 2⁻²⁴ ≈ 5.96e-8
U64 = torch.finfo(torch.float64).eps / 2  # 2⁻⁵³ ≈ 1.11e-16


def gamma(n: int, u: float = U32) -> float:
    """Higham's γ_n = n·u / (1 − n·u): the relative error bound of a length-n inner product."""
    if n * u >= 1:
        raise ValueError(f"γ_n undefined for n·u = {n * u} ≥ 1")
    return n * u / (1 - n * u)


def logits_atol_float64(logits: torch.Tensor, *, depth: int, width: int) -> float:
    """Two float64 evaluations of the same network on the same stored weights, in different operation order.

    Each of ``depth`` sequential products (inner dimension ≤ ``width``) adds a relative error ≤ γ_width(u64);
    normalized residual networks do not amplify relative errors by more than their depth to first order, so
    the logits differ by at most ``depth · γ_width · max|z|`` (≈ 1e-12 here: any real difference between the
    two models, e.g. a wrong scaling or a missing module, is ≥ 1e-4).
    """
    return depth * gamma(width, U64) * logits.abs().max().item()


def perturbed_weights_logits_atol(logits: torch.Tensor, relative_errors) -> float:
    """Logits of a model whose weight matrices carry small relative perturbations ``ε_l = max|δW_l| / max|W_l|``
    (float32 storage of a merged weight, of a residual, of refactorized factors), against the exact model.

    To first order the logits move by ``Σ_l (∂z/∂W_l)·δW_l``; in a pre-norm residual network the logits'
    relative sensitivity to a relative change of one weight matrix is ≤ 1 (the normalization removes any gain),
    so ``|δz| ≤ Σ_l ε_l · max|z|``. A first-order estimate, not a proof: the scale the difference has.
    """
    return sum(relative_errors) * logits.abs().max().item()


def merged_weights_logits_atol(logits: torch.Tensor, *, matrices: int, roundings: int) -> float:
    """Logits of a model whose weights were merged in float32 (``W ← fl(W + ΔW)``, ``roundings`` times per
    matrix, over ``matrices`` matrices), against the unmerged update evaluated exactly (float64).

    Each merge rounds every entry once, ``|δW| ≤ u32·|W|``: ``perturbed_weights_logits_atol`` with
    ``ε = roundings · u32`` per matrix (measured 1.06e-5 against 3.0e-5 for stories260K's chain: 10 matrices,
    3 links).
    """
    return perturbed_weights_logits_atol(logits, [roundings * U32] * matrices)
