"""Randomized top-k SVD of stacked matrices, with its time in GEMMs (Halko, Martinsson & Tropp 2011).

Subspace iteration on ``W (L, m, n)`` with ``q = k + oversample`` columns
(``Ω (n, q)`` Gaussian), one *pass* = one product with ``W`` or ``Wᵀ``::

    W Ω   = Q₀ R        (m, q)   pass 1
    Wᵀ Q₀ = Z₀ R        (n, q)   pass 2     ← check 0: σ(R) = σ(Q₀ᵀ W)
    W Z₀  = Q₁ R,  Wᵀ Q₁ = Z₁ R  passes 3-4 ← check 1 (one power iteration)
    …

After ``t`` power iterations (``2 + 2t`` passes) ``Qₜ`` spans
``(W Wᵀ)ᵗ W Ω`` and the last product already *is* the projection of ``W`` on
that span: ``Qₜᵀ W = Rᵀ Zₜᵀ``. So the SVD of the small ``Rᵀ = Ur Σ Vrᵀ``
finishes, ``U = Qₜ Ur``, ``V = Zₜ Vr``, without the extra pass ``Qᵀ W`` and
the ``(q, n)`` SVD of ``torch.svd_lowrank`` — same subspace, same numbers in
exact arithmetic as HMT Algorithm 4.4 + 5.1 with ``t`` iterations.

Orthonormalization between passes (needed in float32: docs/maths.md §10) is
CholeskyQR2 (Yamamoto et al. 2015): Gram ``XᵀX``, Cholesky, triangular
solve, twice — all GEMM-shaped, 10–40× cheaper than Householder QR on skinny
``(m, q)`` blocks on the CPU. When the Gram is too ill-conditioned (``κ(X)``
beyond ≈ ``u^{-1/2}``) Cholesky fails or the first pass leaves ``Q₁`` far
from orthonormal; that item is redone by Householder QR (see
:func:`cholesky_qr2`).

Accuracy: ``tol=None`` runs exactly ``n_iter`` iterations (the historical
behaviour). With ``tol`` the top-k singular values are checked after every
iteration and the item stops once their relative change, extrapolated
geometrically to the limit, is below ``tol`` (cap ``max_iter``);
``phi_tol`` also asks the top-k left subspace to settle (``1 − φ`` between
successive iterates). Each item reports its passes, last change and a
probabilistic bound on ``‖W − QQᵀW‖₂`` from a few Gaussian probes (HMT §4.3)
that ride along with the first pass for free.

Batching: items are processed ``block`` at a time (default: one at a time on
the CPU, where a batched product is no faster than a loop and one item keeps
the upcast workspace to one matrix; the whole stack on CUDA). Half-precision
input is upcast one block at a time, never as a full copy. Each item's result
depends only on its own matrix and seed, not on the block size (up to the
rounding of batched vs single GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

#: ``‖Q₁ᵀQ₁ − I‖_F`` above which CholeskyQR2 hands the block to Householder: at ≤ 1/2,
#: ``κ(Q₁)² ≤ (1 + 1/2)/(1 − 1/2) = 3``, so the second pass is orthonormal to working precision.
GRAM_DEVIATION_MAX = 0.5

#: HMT (4.3): ``‖E‖₂ ≤ α √(2/π) maxᵢ ‖E ωᵢ‖`` with probability ``≥ 1 − α^{-p}`` for ``p`` Gaussian probes.
PROBE_ALPHA = 10.0


@dataclass(frozen=True, eq=False)
class LowRankSVD:
    """Top-k SVD ``W ≈ U diag(S) Vh`` of a stack, and how it was found.

    ``U (..., m, k)``, ``S (..., k)`` descending, ``Vh (..., k, n)``;
    ``passes (...)``: products with ``W`` or ``Wᵀ`` (``2 + 2·iterations``);
    ``change (...)``: max relative change of ``σ_1..σ_k`` over the last
    iteration (NaN with no iteration); ``error (...)``: the relative error of
    ``σ_1..σ_k`` still to come, extrapolated from the last changes
    (``change·ρ/(1 − ρ)``, ``ρ`` their ratio; NaN before three checks);
    ``residual (...)``: probabilistic upper bound of ``‖W − QQᵀW‖₂ / σ̂_1``
    (HMT §4.3, holds with probability ``≥ 1 − 10^{-probes}``; close to the
    Frobenius tail on flat spectra, so loose there; NaN without probes);
    ``fallbacks (...)``: orthonormalizations redone by Householder QR.
    Behaves as the tuple ``(U, S, Vh)`` (unpacking, indexing, ``len``), as
    ``randomized_svd`` always returned.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    passes: torch.Tensor
    change: torch.Tensor
    error: torch.Tensor
    residual: torch.Tensor
    fallbacks: torch.Tensor

    def __iter__(self):
        return iter((self.U, self.S, self.Vh))

    def __getitem__(self, i):
        return (self.U, self.S, self.Vh)[i]

    def __len__(self) -> int:
        return 3


def cholesky_qr2(X: torch.Tensor, householder: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin QR ``X (B, m, q) = Q R`` by CholeskyQR2; returns ``Q (B, m, q)``, ``R (B, q, q)``, ``fell_back (B,)``.

    Pass 1: ``XᵀX = R₁ᵀR₁``, ``Q₁ = X R₁⁻¹``; pass 2 the same on ``Q₁``;
    ``R = R₂ R₁``. Pass 1 alone loses orthogonality as ``u κ(X)²``; pass 2
    restores it to ``O(u)`` when ``Q₁`` is well conditioned, which the Gram
    of pass 2 measures for free: ``‖Q₁ᵀQ₁ − I‖_F ≤`` :data:`GRAM_DEVIATION_MAX`.
    Items where a Cholesky fails (``κ(X)² u ≳ 1``) or that test fails are
    redone by Householder QR (``fell_back`` marks them). ``householder=True``
    takes Householder for every item (the reference path).
    """
    if householder:
        Q, R = torch.linalg.qr(X)
        return Q, R, torch.ones(X.shape[0], dtype=torch.bool, device=X.device)
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    R1, info1 = torch.linalg.cholesky_ex(X.mT @ X, upper=True)  # (B, q, q)
    Q1 = torch.linalg.solve_triangular(R1, X, upper=True, left=False)  # (B, m, q)
    G2 = Q1.mT @ Q1  # (B, q, q)
    deviation = torch.linalg.matrix_norm(G2 - eye)  # (B,), NaN when pass 1 broke down
    R2, info2 = torch.linalg.cholesky_ex(G2, upper=True)
    Q = torch.linalg.solve_triangular(R2, Q1, upper=True, left=False)
    R = R2 @ R1
    bad = (info1 != 0) | (info2 != 0) | ~(deviation <= GRAM_DEVIATION_MAX)
    if bool(bad.any()):
        Qh, Rh = torch.linalg.qr(X[bad])
        Q[bad], R[bad] = Qh, Rh
    return Q, R, bad


def sketches(L: int, n: int, q: int, probes: int, seed: int | Sequence[int],
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian ``Ω (L, n, q)`` and probes ``P (L, n, probes)`` on the CPU.

    An int ``seed``: one generator draws all ``Ω`` then all ``P``. A sequence
    (one seed per item): each item draws its own ``Ω`` then ``P``, so its
    numbers do not depend on the batch it is computed in.
    """
    if isinstance(seed, int):
        gen = torch.Generator().manual_seed(seed)
        return (torch.randn(L, n, q, generator=gen, dtype=dtype),
                torch.randn(L, n, probes, generator=gen, dtype=dtype))
    seeds = list(seed)
    if len(seeds) != L:
        raise ValueError(f"{len(seeds)} seeds for {L} matrices; expected one seed per matrix of (L, m, n).")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    omega = [torch.randn(n, q, generator=g, dtype=dtype) for g in gens]
    probe = [torch.randn(n, probes, generator=g, dtype=dtype) for g in gens]
    if not seeds:
        return torch.empty(0, n, q, dtype=dtype), torch.empty(0, n, probes, dtype=dtype)
    return torch.stack(omega), torch.stack(probe)


def compute_dtype(dtype: torch.dtype, asked: torch.dtype | None = None) -> torch.dtype:
    """The dtype products run in: ``asked``, else float32 for half/integer input, else the input's."""
    if asked is not None:
        return asked
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype


def range_svd(
    W: torch.Tensor,
    k: int,
    *,
    oversample: int = 16,
    n_iter: int = 4,
    tol: float | None = None,
    max_iter: int = 32,
    phi_tol: float | None = None,
    seed: int | Sequence[int] = 0,
    dtype: torch.dtype | None = None,
    probes: int = 4,
    householder: bool = False,
    block: int | None = None,
) -> LowRankSVD:
    """Top-``k`` SVD of ``W (..., m, n)`` by the range finder above; signs *not* fixed.

    ``q = min(k + oversample, m, n)`` columns. ``tol=None``: ``n_iter``
    power iterations. ``tol``: iterate until the extrapolated relative error
    of ``σ_1..σ_k`` is ``≤ tol`` (and, with ``phi_tol``, ``1 − φ`` of the
    top-k left subspace between iterations ``≤ phi_tol``), at most
    ``max_iter``. ``probes`` Gaussian probes give the residual bound (0: none).
    ``householder=True`` orthonormalizes by Householder QR throughout.
    ``block``: items per batched product (default 1 on the CPU, all on CUDA).
    """
    *batch, m, n = W.shape
    q = min(k + oversample, m, n)
    k = min(k, q)
    dt = compute_dtype(W.dtype, dtype)
    W3 = W.reshape(-1, m, n)  # a view for a contiguous stack
    L = W3.shape[0]
    omega, probe = sketches(L, n, q, probes, seed, dt)
    if L == 0:
        return _empty(tuple(batch), m, n, k, dt, W.device)
    step = block or (L if W.device.type == "cuda" else 1)
    parts = []
    for lo in range(0, L, step):
        Wb = W3[lo: lo + step].to(dt)  # upcast one block: the only copy of the input
        parts.append(_finder_block(Wb, omega[lo: lo + step].to(W.device), probe[lo: lo + step].to(W.device), k,
                                   n_iter, tol, max_iter, phi_tol, householder))
        del Wb
    U, S, Vh, passes, change, error, residual, fallbacks = (torch.cat(p) for p in zip(*parts))
    shape = tuple(batch)
    return LowRankSVD(U.reshape(*shape, m, k), S.reshape(*shape, k), Vh.reshape(*shape, k, n),
                      *(t.reshape(shape) for t in (passes, change, error, residual, fallbacks)))


def _empty(batch: tuple[int, ...], m: int, n: int, k: int, dt: torch.dtype, device) -> LowRankSVD:
    f, i = dict(dtype=dt, device=device), dict(dtype=torch.long, device=device)
    return LowRankSVD(torch.empty(*batch, m, k, **f), torch.empty(*batch, k, **f), torch.empty(*batch, k, n, **f),
                      torch.empty(batch, **i), *(torch.empty(batch, **f) for _ in range(3)), torch.empty(batch, **i))


def _finder_block(W: torch.Tensor, omega: torch.Tensor, probe: torch.Tensor, k: int, n_iter: int,
                  tol: float | None, max_iter: int, phi_tol: float | None, householder: bool):
    """One block ``W (B, m, n)`` in the compute dtype; see :func:`range_svd`."""
    B, q, p = W.shape[0], omega.shape[-1], probe.shape[-1]
    dev, dt = W.device, W.dtype
    tiny = torch.finfo(dt).tiny
    adaptive = tol is not None
    fallbacks = torch.zeros(B, dtype=torch.long, device=dev)

    def orth(X):
        Qx, Rx, bad = cholesky_qr2(X, householder)
        fallbacks.add_(bad.long())
        return Qx, Rx

    def ritz(Q, R):
        """Top-k σ of ``Qᵀ W = Rᵀ Zᵀ``, and (for ``phi_tol``) the left factors ``(Ur_k, Q)`` of its top-k subspace."""
        if phi_tol is None:
            return torch.linalg.svdvals(R)[..., :k], None
        Ur, sv, _ = torch.linalg.svd(R.mT)
        return sv[..., :k], (Ur[..., :k], Q)

    Y = W @ torch.cat([omega, probe], -1)  # (B, m, q + p): the probes ride along with pass 1
    Yp = Y[..., q:]  # (B, m, p) = W P, independent of every Q below
    Q, _ = orth(Y[..., :q])  # (B, m, q)
    Z, R = orth(W.mT @ Q)  # (B, n, q); Qᵀ W = Rᵀ Zᵀ
    active = torch.ones(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    nan = torch.full((B,), math.nan, dtype=dt, device=dev)
    change = last_change = remaining = last_ratio = nan
    # fixed n_iter: only the last three checks are needed (change, and its ratio for the extrapolation)
    checked = (lambda it: True) if adaptive else (lambda it: it >= n_iter - 2)
    sv_prev, sub_prev = ritz(Q, R) if checked(0) else (None, None)
    # rounding floor of a relative change of σ_k: σ estimates carry absolute errors ~ √q u σ_1 per pass
    floor = 4 * math.sqrt(q) * torch.finfo(dt).eps
    for it in range(1, (max_iter if adaptive else n_iter) + 1):
        Qn, _ = orth(W @ Z)  # (B, m, q)
        Zn, Rn = orth(W.mT @ Qn)  # (B, n, q)
        Q, Z, R = _keep(active, Qn, Q), _keep(active, Zn, Z), _keep(active, Rn, R)
        iters = torch.where(active, it, iters)
        if not checked(it):
            continue
        sv, sub = ritz(Q, R)
        if sv_prev is not None:
            rel = ((sv - sv_prev).abs() / sv.clamp_min(tiny)).amax(-1)
            last_change, change = change, torch.where(active, rel, change)
            # linear convergence: the error left ≈ Σ_{j≥1} change ρʲ, ρ = ratio of successive changes
            # (NaN until two changes are known; a ratio ≥ 1, not yet in the linear regime, is capped at 0.99)
            ratio = change / last_change
            rho = torch.fmax(ratio, last_ratio).clamp(max=0.99)  # the slower of the last two rates
            last_ratio = torch.where(active, ratio, last_ratio)
            remaining = torch.where(active, change * rho / (1 - rho), remaining)
        if adaptive:
            at_floor = change <= floor * sv[..., 0] / sv[..., -1].clamp_min(tiny)
            # ×2 margin: on slowly decaying spectra the rate still creeps up when the changes first fall
            # below tol, and the plain extrapolation fell short by up to 1.6× (i^-1/4 and Marchenko-Pastur tests)
            ok = (change <= tol / 2) & ((remaining <= tol / 2) | at_floor)
            if phi_tol is not None:
                ok &= (1 - _phi_successive(sub, sub_prev)) <= phi_tol
            active = active & ~ok
            if not bool(active.any()):
                break
        sv_prev, sub_prev = sv, sub
    # Qᵀ W = Rᵀ Zᵀ, Rᵀ = Ur Σ Vrᵀ  ⇒  W ≈ (Q Ur) Σ (Z Vr)ᵀ
    Ur, S, Vrh = torch.linalg.svd(R.mT)
    U = Q @ Ur[..., :k]  # (B, m, k)
    Vh = Vrh[..., :k, :] @ Z.mT  # (B, k, n)
    S = S[..., :k]
    if p:
        E = Yp - Q @ (Q.mT @ Yp)  # (B, m, p) = (I − QQᵀ) W P
        bound = PROBE_ALPHA * math.sqrt(2 / math.pi) * torch.linalg.vector_norm(E, dim=-2).amax(-1)
        residual = torch.where(S[..., 0] > 0, bound / S[..., 0].clamp_min(tiny), 0.0)
    else:
        residual = torch.full((B,), math.nan, dtype=dt, device=dev)
    return U, S, Vh, 2 + 2 * iters, change, remaining, residual, fallbacks


def _keep(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for items still iterating, ``old`` for converged ones (so a batch = its items alone)."""
    if bool(active.all()):
        return new
    return torch.where(active[:, None, None], new, old)


def _phi_successive(cur: tuple[torch.Tensor, torch.Tensor], prev: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """φ between top-k left subspaces ``Q Ur_k`` of two iterations, from the small factors: ``(B,)``."""
    (Ur, Q), (Ur0, Q0) = cur, prev
    M = Ur.mT @ (Q.mT @ Q0) @ Ur0  # (B, k, k) = U_kᵀ U_k⁰
    return (M ** 2).sum((-2, -1)) / Ur.shape[-1]
