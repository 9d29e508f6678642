"""Kernels against float64 references, scipy, and invariants."""

import numpy as np
import pytest
import scipy.linalg
import torch

from lora_lens.linalg import (
    factored_svd, lstsq, phi, phi_grid, principal_angles, random_orthonormal, randomized_svd, sign_fix, svd,
)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_factored_svd_equals_materialized_batched_and_negative_scaling():
    B, A = _rand(3, 50, 4), _rand(3, 4, 30, seed=1)
    s = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    U, S, Vh = factored_svd(B, A, s)
    D = s[:, None, None] * (B @ A)
    assert torch.allclose(U * S.unsqueeze(-2) @ Vh, D, atol=1e-12)
    assert torch.allclose(S, torch.linalg.svdvals(D)[:, :4], rtol=1e-10)
    assert torch.allclose(U.transpose(-1, -2) @ U, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # batched == looped
    for i in range(3):
        Ui, Si, Vhi = factored_svd(B[i], A[i], float(s[i]))
        assert torch.allclose(Si, S[i]) and torch.allclose(Ui, U[i]) and torch.allclose(Vhi, Vh[i])


def test_factored_svd_upcasts_half_precision():
    B, A = _rand(20, 3).bfloat16(), _rand(3, 10, seed=2).bfloat16()
    U, S, Vh = factored_svd(B, A)
    assert S.dtype == torch.float32
    ref = torch.linalg.svdvals(B.double() @ A.double())[:3]
    assert torch.allclose(S.double(), ref, rtol=1e-5)


def test_svd_wide_and_tall_and_signs_deterministic():
    for shape in [(40, 70), (70, 40)]:
        W = _rand(2, *shape)
        U, S, Vh = svd(W)
        assert torch.allclose(U * S.unsqueeze(-2) @ Vh, W, atol=1e-12)
        idx = U.abs().argmax(dim=-2)
        assert (torch.gather(U, -2, idx.unsqueeze(-2)) > 0).all()
    U2, Vh2 = sign_fix(-U, -Vh)
    assert torch.allclose(U2, U) and torch.allclose(Vh2, Vh)


def test_randomized_svd_accuracy_on_decaying_spectrum():
    # an LLM-like slowly decaying spectrum σ_i = 1/√i
    n = 300
    Uo, Vo = random_orthonormal(n, n, seed=1, dtype=torch.float64), random_orthonormal(n, n, seed=2, dtype=torch.float64)
    sig = 1 / torch.arange(1, n + 1, dtype=torch.float64).sqrt()
    W = (Uo * sig) @ Vo.T
    k = 16
    U, S, Vh = randomized_svd(W, k, oversample=16, n_iter=6)
    rel = ((S - sig[:k]) / sig[:k]).abs()
    assert rel[: k // 2].max() < 1e-3 and rel.max() < 0.05
    assert phi(U[:, :8], Uo[:, :8]) > 0.99
    # documented trade-off: no oversampling is clearly worse on the k-th value
    _, S0, _ = randomized_svd(W, k, oversample=0, n_iter=0)
    assert ((S0[-1] - sig[k - 1]) / sig[k - 1]).abs() > rel[-1]


def test_principal_angles_match_scipy_including_tiny_angles():
    X = torch.linalg.qr(_rand(20, 4))[0]
    Y = torch.linalg.qr(_rand(20, 6, seed=3))[0]
    ours = principal_angles(X, Y).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(X.numpy(), Y.numpy()))
    assert np.allclose(ours, ref, atol=1e-12)
    Xs = torch.linalg.qr(X + 1e-9 * _rand(20, 4, seed=4))[0]
    ours = principal_angles(X, Xs).numpy()
    ref = np.sort(scipy.linalg.subspace_angles(X.numpy(), Xs.numpy()))
    assert np.allclose(ours, ref, rtol=1e-6) and ours.max() < 1e-7


def test_phi_invariants():
    X = torch.linalg.qr(_rand(30, 5))[0]
    Y = torch.linalg.qr(_rand(30, 7, seed=5))[0]
    assert phi(X, X).item() == pytest.approx(1.0)
    assert phi(X, Y).item() == pytest.approx(phi(Y, X).item())
    assert phi(X, Y).item() == pytest.approx((torch.cos(principal_angles(X, Y)) ** 2).mean().item())
    R = random_orthonormal(30, 30, seed=9, dtype=torch.float64)
    assert phi(R @ X, R @ Y).item() == pytest.approx(phi(X, Y).item())  # rotation invariance
    g = phi_grid(X, Y)
    for i in (1, 3, 5):
        for j in (1, 4, 7):
            assert g[i - 1, j - 1].item() == pytest.approx(phi(X, Y, i, j).item())


def test_lstsq_exact_square_and_least_squares():
    A, B = _rand(6, 6), _rand(6, 2, seed=1)
    X, r = lstsq(A, B)
    assert torch.allclose(A @ X, B, atol=1e-10) and r.item() < 1e-12
    A2 = _rand(9, 5, seed=2)
    X2, r2 = lstsq(A2, _rand(9, 2, seed=3))
    ref = torch.linalg.lstsq(A2, _rand(9, 2, seed=3)).solution
    assert torch.allclose(X2, ref, atol=1e-10) and 0 < r2.item() < 1
    # singular square: falls back to the minimum-norm solution
    S = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    Xs, _ = lstsq(S, torch.ones(3, 1, dtype=torch.float64))
    assert torch.allclose(Xs.squeeze(), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))


def test_lstsq_rank_deficient_square_uses_the_pseudo_inverse():
    # a 64×64 matrix of rank 56: LU returns huge finite garbage; the min-norm solution is the reference
    g = torch.Generator().manual_seed(7)
    A = torch.randn(64, 56, generator=g, dtype=torch.float64) @ torch.randn(56, 64, generator=g, dtype=torch.float64)
    B = torch.randn(64, 3, generator=g, dtype=torch.float64)
    X, r = lstsq(A, B)
    ref = torch.linalg.pinv(A, rtol=64 * torch.finfo(torch.float64).eps) @ B
    assert torch.allclose(X, ref, atol=1e-8) and X.abs().max() < 100
    assert r.item() == pytest.approx(torch.linalg.matrix_norm(A @ ref - B).item() / torch.linalg.matrix_norm(B).item())
    # an explicit rcond always takes the pseudo-inverse, also for a square, well-conditioned A
    X2, _ = lstsq(A[:, :8].T @ A[:, :8] + torch.eye(8, dtype=torch.float64), B[:8], rcond=0.5)
    assert torch.isfinite(X2).all()


def test_folded_condition_number_does_not_depend_on_the_core_driver(monkeypatch):
    """``cond`` of :func:`factored_svd_folded` decides the exact-path fallback (ops/resize.py ``folded``: eps·cond ≤
    1e-5, i.e. cond up to 4.5e10 in float64), so it must resolve rank deficiency far past that whatever driver the
    core goes to. A Gram-based driver such as CUDA's ``gesvda`` (the range finder's) floors σ_min at ~√u·σ₁ ≈
    1e-8σ₁: cond ≈ 1e8 and a singular B folded through Rb⁻¹. Emulated here on the CPU with the Gram's eigenvalues."""
    import lora_lens.linalg as linalg

    real = linalg.core_svd

    def gram_core_svd(C, values_only=False):  # gesvda's accuracy model: σᵢ = √λᵢ(CᵀC)
        if not values_only:
            return real(C)
        return torch.linalg.eigvalsh(C.mT @ C).abs().sqrt().flip(-1)  # |λ|: rounding can leave λ_min either sign

    monkeypatch.setattr(linalg, "core_svd", gram_core_svd)
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(5, 30, generator=g, dtype=torch.float64)
    B[:, 1] = B[:, 0]  # rank 4 of 5: cond(Rb) ≈ 1/u
    assert float(gram_core_svd(torch.linalg.qr(B, mode="r")[1], values_only=True)[-1]) > 0  # the floor: ~√u·σ₁, not 0
    assert float(linalg.factored_svd_folded(B, A)[3]) > 1e12
    B[:, 1] = torch.randn(40, generator=g, dtype=torch.float64)  # well conditioned: cond as before
    cond = float(linalg.factored_svd_folded(B, A)[3])
    assert 1 <= cond < 1e3
