"""Linear-algebra kernels on plain tensors, batched over any leading dimensions.

Shapes: ``(..., m, n)`` means any number of leading batch dimensions. Inputs in
bf16/fp16 are upcast to ``compute_dtype`` (float32 unless asked) before
``torch.linalg``; results stay on the input's device.

- :func:`factored_svd`: SVD of ``s·B A`` without forming the ``(m, n)`` matrix;
  :func:`factored_svdvals`: its singular values only.
- :func:`svd`: full thin SVD, run in the tall orientation (faster with MKL).
- :func:`randomized_svd`: top-k by a randomized range finder with power iterations
  (the kernel lives in :mod:`lora_lens.randomized`);
  :func:`top_left_subspace`: CoRA's top-r left subspace (exact or randomized).
- :func:`top_subspace_svd`: top-k accurate enough to compare subspaces: a full SVD
  for small matrices, else subspace iteration until a measured error bound is met.
- :func:`sign_fix`: deterministic signs (``svd_flip``-style).
- :func:`principal_angles`, :func:`phi`, :func:`phi_grid`: subspace comparisons.
- :func:`lstsq`: least squares / exact solve with the residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import torch

from .errors import ConfigError
from .precision import full_fp32
from .randomized import LowRankSVD, range_svd


def upcast(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Half precision → float32 (or ``dtype``); float32/64 unchanged unless ``dtype`` says."""
    if dtype is not None:
        return x.to(dtype)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _column_signs(U: torch.Tensor) -> torch.Tensor:
    """``(..., 1, k)``: the sign (±1, never 0) of the largest-|·| entry of each column of ``U (..., m, k)``."""
    idx = U.abs().argmax(dim=-2, keepdim=True)  # (..., 1, k)
    signs = torch.sign(torch.gather(U, -2, idx))  # (..., 1, k)
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def sign_fix(U: torch.Tensor, Vh: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flip each singular pair so the largest-|·| entry of each column of U is positive.

    ``U (..., m, k)``, ``Vh (..., k, n)``; ``U diag(S) Vh`` is unchanged.
    """
    signs = _column_signs(U)
    U = U * signs
    if Vh is not None:
        Vh = Vh * signs.transpose(-1, -2)  # (..., k, 1)
    return U, Vh


def core_svd(C: torch.Tensor, values_only: bool = False):
    """Thin SVD (or singular values) of the small ``(..., p, q)`` cores of the factored kernels.

    On CUDA the cores are decomposed in float64 and the results cast back. torch's default CUDA driver
    for them is ``gesvdj``, whose float32 Jacobi sweeps stop short of LAPACK's accuracy: with it, merge
    of 8 rank-16 adapters (128×128 cores; bench_merge.py on an H200) came out 1.7e-5 from float64 on
    the GPU against 1.2e-6 on the CPU. In float64 the sweeps converge far below float32's rounding, and,
    unlike the Gram-based ``gesvda`` the range finder uses for its full-rank Ritz blocks, Jacobi keeps
    the singular vectors of a rank-deficient core orthonormal (an adapter whose B has dead columns).
    On the CPU: LAPACK in the input's dtype, as before.
    """
    if C.device.type == "cuda" and C.dtype != torch.float64:
        C64 = C.double()
        if values_only:
            return torch.linalg.svdvals(C64).to(C.dtype)
        return tuple(x.to(C.dtype) for x in torch.linalg.svd(C64, full_matrices=False))
    return torch.linalg.svdvals(C) if values_only else torch.linalg.svd(C, full_matrices=False)


@full_fp32
def factored_svd(
    B: torch.Tensor, A: torch.Tensor, scaling: float | torch.Tensor = 1.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``ΔW = s · B A`` without forming it (docs/maths.md §1).

    ``B (..., m, r)``, ``A (..., r, n)``; ``scaling`` a float or ``(...)`` tensor.
    QR of ``B = Qb Rb`` and ``Aᵀ = Qa Ra``, SVD of the small core
    ``Rb Raᵀ = Uc Σ Vcᵀ``; then ``U = Qb Uc (..., m, k)``, ``S = |s| Σ (..., k)``,
    ``Vh = Vcᵀ Qaᵀ (..., k, n)`` with ``k = min(r, m, n)`` (``k = r`` unless the
    rank exceeds a side, e.g. r=8 on a 3-class head). Cost ``O((m + n) r²)``;
    exact. Signs fixed; a negative ``s`` goes into ``Vh`` so that ``S ≥ 0``.
    """
    B = upcast(B, dtype)
    A = upcast(A, dtype)
    Qb, Rb = torch.linalg.qr(B)  # (..., m, kb), (..., kb, r), kb = min(m, r)
    Qa, Ra = torch.linalg.qr(A.transpose(-1, -2))  # (..., n, ka), (..., ka, r)
    # full_matrices=False keeps U, S, Vh consistent (k columns each) when kb ≠ ka.
    Uc, S, Vch = core_svd(Rb @ Ra.transpose(-1, -2))  # (..., kb, k), (..., k), (..., k, ka)
    U = Qb @ Uc  # (..., m, k)
    s = torch.as_tensor(scaling, dtype=S.dtype, device=S.device).expand(S.shape[:-1])  # (...)
    S = S * s.abs().unsqueeze(-1)
    # Sign fix and the sign of s applied to the small (k, ka) core before the big
    # product, not to the (k, n) result: one pass over Vh saved (same numbers).
    signs = _column_signs(U)  # (..., 1, k)
    U = U.mul_(signs)
    flip = signs.transpose(-1, -2) * torch.where(s < 0, -1.0, 1.0).to(S.dtype)[..., None, None]  # (..., k, 1)
    Vh = (Vch * flip) @ Qa.transpose(-1, -2)  # (..., k, n)
    return U, S, Vh


@full_fp32
def factored_svdvals(
    B: torch.Tensor, A: torch.Tensor, scaling: float | torch.Tensor = 1.0, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Singular values of ``ΔW = s · B A`` only: ``(..., k)`` descending, ``k = min(r, m, n)``.

    Same maths as :func:`factored_svd` without the orthogonal factors: only the
    triangular ``R`` of each QR is formed (``mode="r"``: no ``Q``), and the
    ``(r, r)`` core goes to ``svdvals``. About half the cost of the full
    factored SVD, and no ``(m, r)``/``(r, n)`` outputs are allocated.
    """
    B = upcast(B, dtype)
    A = upcast(A, dtype)
    Rb = torch.linalg.qr(B, mode="r")[1]  # (..., kb, r)
    Ra = torch.linalg.qr(A.transpose(-1, -2), mode="r")[1]  # (..., ka, r)
    S = core_svd(Rb @ Ra.transpose(-1, -2), values_only=True)  # (..., k)
    s = torch.as_tensor(scaling, dtype=S.dtype, device=S.device).expand(S.shape[:-1])  # (...)
    return S * s.abs().unsqueeze(-1)


@full_fp32
def factored_svd_folded(
    B: torch.Tensor, A: torch.Tensor, scaling: float | torch.Tensor = 1.0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`factored_svd`'s triplets folded into factors, without forming ``Q``, ``U`` or ``Vh``.

    ``B (..., m, r)``, ``A (..., r, n)``. The same core as :func:`factored_svdvals`
    (only the triangular ``R`` of each QR: ``B = Qb Rb``, ``Aᵀ = Qa Ra``; ``Rb Raᵀ =
    Uc Σ Vcᵀ``), then, since ``Qb = B Rb⁻¹`` and ``Qaᵀ = Ra⁻ᵀ A``,

        ``Bf = B (Rb⁻¹ Uc Σ^½)  (..., m, k)``,   ``Af = (Σ^½ Vcᵀ Ra⁻ᵀ) A  (..., k, n)``

    with ``s·Bf Af = s·B A`` at the same scale ``s``: column ``i`` of ``Bf`` is
    ``(σᵢ/|s|)^½ uᵢ`` (``S = |s| Σ``, descending), so keeping the first ``k`` columns /
    rows at scale ``s`` is the best rank-``k`` approximation. One
    small triangular solve and one product per factor replace forming ``Q`` and
    ``Q Uc``. Returns ``S (..., k)``, ``Bf``, ``Af`` and ``cond (...)``, the larger
    condition number of ``Rb`` and ``Ra``: the folded factors carry a relative error
    of about ``eps · cond`` (exact when nothing is cut), so callers fall back to
    :func:`factored_svd` where it is large. Needs ``r ≤ min(m, n)``.
    """
    B = upcast(B, dtype)
    A = upcast(A, dtype)
    Rb = torch.linalg.qr(B, mode="r")[1]  # (..., r, r)
    Ra = torch.linalg.qr(A.transpose(-1, -2), mode="r")[1]  # (..., r, r)
    Uc, S, Vch = core_svd(Rb @ Ra.transpose(-1, -2))  # (..., r, r), (..., r), (..., r, r)
    s = torch.as_tensor(scaling, dtype=S.dtype, device=S.device).expand(S.shape[:-1])  # (...)
    root = S.clamp_min(0).sqrt()  # (..., r): Σ^½, before the scale
    S = S * s.abs().unsqueeze(-1)
    Mb = torch.linalg.solve_triangular(Rb, Uc * root.unsqueeze(-2), upper=True)  # Rb⁻¹ Uc S^½ (..., r, r)
    # Ma = S^½ Vcᵀ Ra⁻ᵀ = (Ra⁻¹ Vc S^½)ᵀ
    Ma = torch.linalg.solve_triangular(Ra, (Vch * root.unsqueeze(-1)).transpose(-1, -2), upper=True)
    Bf = B @ Mb  # (..., m, r)
    Af = Ma.transpose(-1, -2) @ A  # (..., r, n): Bf Af = B A, so s·Bf Af = ΔW whatever the sign of s
    # cond decides the exact-path fallback (eps·cond ≤ 1e-5: up to 4.5e10 in float64), so it must see σ_min far
    # below √u·σ₁: the input dtype's default drivers, never a Gram-based one (gesvda floors σ_min there).
    sv_b, sv_a = torch.linalg.svdvals(Rb), torch.linalg.svdvals(Ra)
    cond = torch.maximum(sv_b[..., 0] / sv_b[..., -1], sv_a[..., 0] / sv_a[..., -1])  # inf when singular
    return S, Bf, Af, torch.nan_to_num(cond, nan=float("inf"))


def svd(W: torch.Tensor, dtype: torch.dtype | None = None, fix_signs: bool = True):
    """Full thin SVD ``W (..., m, n) = U (..., m, k) diag(S) Vh (..., k, n)``, ``k = min(m, n)``.

    Decomposes the tall orientation (a wide 4096×11008 matrix was 3× slower
    than its transpose with MKL, docs/maths.md §1) and transposes back.
    """
    W = upcast(W, dtype)
    if W.shape[-1] > W.shape[-2]:
        V, S, Uh = torch.linalg.svd(W.transpose(-1, -2), full_matrices=False)
        U, Vh = Uh.transpose(-1, -2), V.transpose(-1, -2)
    else:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    if fix_signs:
        U, Vh = sign_fix(U, Vh)
    return U, S, Vh


@full_fp32
def randomized_svd(
    W: torch.Tensor,
    k: int,
    oversample: int = 16,
    n_iter: int = 4,
    seed: int | Sequence[int] = 0,
    dtype: torch.dtype | None = None,
    **finder,
) -> LowRankSVD:
    """Top-``k`` SVD of ``W (..., m, n)`` by a randomized range finder (Halko et al. 2011).

    ``q = k + oversample`` Gaussian columns, ``n_iter`` power iterations
    normalized after every product (without it float32 loses the tail:
    docs/maths.md §10) — LU-normalized, and by CholeskyQR2 with a Householder
    fallback where an orthonormal iterate is needed; see
    :mod:`lora_lens.randomized`, whose keyword options (``tol``, ``max_iter``,
    ``phi_tol``, ``subspace_tol``, ``probes``, ``ortho``, ``block``, ``half_passes``)
    ``finder`` passes on — ``tol`` replaces the fixed ``n_iter`` by an
    accuracy target. Returns a :class:`~lora_lens.randomized.LowRankSVD`
    that unpacks as ``U (..., m, k), S (..., k), Vh (..., k, n)``, signs
    fixed, plus passes, last change, a residual bound and ``sv_bound`` (a bound on the relative
    error of ``S`` that holds; 0 on the exact path) per matrix. Input
    in bf16/fp16 is upcast once, one block at a time. Falls back to the
    exact SVD when ``q`` reaches ``min(m, n)``. Deterministic for a given
    ``seed``; a sequence of seeds (one per matrix of a ``(L, m, n)`` stack)
    makes each matrix's result independent of the stack it is in.
    """
    m, n = W.shape[-2:]
    if min(k + oversample, m, n) >= min(m, n):
        U, S, Vh = svd(W, dtype)
        batch = W.shape[:-2]
        zero = torch.zeros(batch, dtype=torch.long, device=S.device)
        exact = torch.zeros(batch, dtype=S.dtype, device=S.device)  # no change, no error, no residual
        return LowRankSVD(U[..., :k], S[..., :k], Vh[..., :k, :], zero, exact, exact, exact, zero, exact, zero,
                          sv_bound=exact)
    res = range_svd(W, k, oversample=oversample, n_iter=n_iter, seed=seed, dtype=dtype, **finder)
    U, Vh = sign_fix(res.U, res.Vh)
    return replace(res, U=U, Vh=Vh)


@full_fp32
def top_left_subspace(S: torch.Tensor, rank: int, oversample: int = 16, n_iter: int = 16,
                      seed: int | Sequence[int] = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` left singular vectors ``(..., m, r)`` and values ``(..., r)`` of ``S (..., m, N)``.

    CoRA's common-subspace kernel (:mod:`lora_lens.methods.cora`), also the
    collection's shared basis (:mod:`lora_lens.compare.collection`): the exact
    SVD when ``r + oversample ≥ min(m, N)/2``, else the randomized range finder
    with ``n_iter`` power iterations (16: see :mod:`lora_lens.methods.cora`).
    Signs fixed; batched over leading dimensions; ``seed`` may give one seed
    per matrix of an ``(L, m, N)`` batch.
    """
    m, N = S.shape[-2:]
    if rank + oversample >= min(m, N) / 2:
        U, sv, _ = svd(S)
        return U[..., :rank], sv[..., :rank]
    U, sv, _ = randomized_svd(S, rank, oversample=oversample, n_iter=n_iter, seed=seed)
    return U, sv


#: Full SVD up to this ``min(m, n)``. Measured here (1 thread, float32): a 512² full SVD
#: costs as much as ~35 subspace iterations at ``q = 24`` (1024²: ~290), and a flat spectrum
#: needs more than 35; beyond it the full SVD grows as ``n³`` and an iteration as ``n²``.
EXACT_SVD_MAX_DIM = 512
#: Target for the estimated ``1 − φ`` between the computed and the exact top-k subspace.
SUBSPACE_TOL = 1e-4
@dataclass(frozen=True)
class SubspaceAccuracy:
    """How :func:`top_subspace_svd` got its subspaces.

    ``method``: ``svd`` when every matrix got a full SVD (exact up to round-off),
    else ``iterated``; ``iterations``: the most iterations any matrix ran;
    ``error (...)``: the estimated ``1 − φ(U_k, U_k^exact)`` per matrix (0 for
    a full SVD); ``exact (...)``: per matrix, whether it got a full SVD.
    """

    method: str
    iterations: int
    error: torch.Tensor
    exact: torch.Tensor


@full_fp32
def top_subspace_svd(
    W: torch.Tensor,
    k: int,
    *,
    oversample: int = 16,
    tol: float = SUBSPACE_TOL,
    max_iter: int | None = None,
    seed: int | Sequence[int] = 0,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SubspaceAccuracy]:
    """Top-``k`` singular triplets of ``W (..., m, n)`` whose *subspaces* are accurate (to ``tol`` in ``1 − φ``).

    A fixed number of power iterations is not enough to compare subspaces: on
    a flat spectrum (``σ_k/σ_{k+1} ≈ 1.005``) four iterations gave φ 0.77–0.84
    against the exact subspace. Here:

    - ``min(m, n) ≤ EXACT_SVD_MAX_DIM`` (or ``k + oversample`` reaches it): full SVD.
    - Else :func:`~lora_lens.randomized.range_svd` with ``q = k + oversample``
      columns and its subspace criterion: after every iteration the Ritz triplets
      ``Qᵀ W = Ub S Vh``, ``U = Q Ub`` satisfy ``Wᵀ U_k = V_k S_k`` exactly, and
      the residual ``R = W V_k − U_k S_k (m, k)`` comes from the product the next
      pass computes anyway; Wedin's theorem bounds ``‖sin Θ‖_F ≤ ‖R‖_F / δ`` with
      the gap ``δ = σ_k − σ_{k+1}``, estimated by the Ritz values, so
      ``1 − φ = ‖sin Θ‖_F² / k ≤ (‖R‖_F / δ)² / k``. Each matrix stops at the
      first check at which that is ``≤ tol`` and keeps that iterate.
    - A matrix not converged after ``max_iter`` (default: about the flop count of
      one full SVD, ``3·min(m, n)/q`` iterations, from ``(4mn² + 8n³) / (4mnq)``)
      gets a full SVD.

    Every matrix's numbers depend only on that matrix and its seed (a sequence
    gives one per matrix of an ``(L, m, n)`` batch; see :func:`~lora_lens.randomized.sketches`),
    never on the others in the batch: the stopping rule is per matrix.
    Returns ``U (..., m, k)``, ``S (..., k)``, ``Vh (..., k, n)`` (signs fixed)
    and a :class:`SubspaceAccuracy`.
    """
    m, n = W.shape[-2:]
    k = min(k, m, n)
    q = min(k + max(oversample, 1), m, n)  # one extra column at least: the gap needs σ_{k+1}
    batch = W.shape[:-2]

    def full(X: torch.Tensor):
        U, S, Vh = svd(X, dtype)
        return U[..., :k], S[..., :k], Vh[..., :k, :]

    if min(m, n) <= EXACT_SVD_MAX_DIM or q >= min(m, n):
        return (*full(W), SubspaceAccuracy("svd", 0, torch.zeros(batch, dtype=torch.float64),
                                           torch.ones(batch, dtype=torch.bool)))
    if max_iter is None:
        max_iter = max(4, math.ceil(3 * min(m, n) / q))
    res = range_svd(W, k, oversample=q - k, subspace_tol=tol, max_iter=max_iter, seed=seed, dtype=dtype, probes=0)
    U, Vh = sign_fix(res.U, res.Vh)
    S = res.S
    exact = ~(res.subspace_error <= tol).cpu()  # NaN (never judged) counts as not converged
    if bool(exact.any()):  # not converged within max_iter: a full SVD for those matrices only
        Uf, Sf, Vf = (t.reshape(-1, *t.shape[len(batch):]) for t in (U, S, Vh))
        ix = exact.reshape(-1).nonzero().flatten().to(Uf.device)
        Uf[ix], Sf[ix], Vf[ix] = full(W.reshape(-1, m, n)[ix])
    method = "svd" if bool(exact.all()) else "iterated"
    err = torch.where(exact, 0.0, res.subspace_error.double().cpu())
    acc = SubspaceAccuracy(method, int(res.passes.max()) // 2 - 1 if res.passes.numel() else 0, err, exact)
    return U, S, Vh, acc


def orthonormal_basis(X: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the column space of ``X (..., m, k)`` via thin QR: ``(..., m, k)``."""
    Q, _ = torch.linalg.qr(upcast(X))
    return Q


@full_fp32
def principal_angles(Qx: torch.Tensor, Qy: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the spans of orthonormal ``Qx (..., m, p)`` and ``Qy (..., m, q)``.

    Cosines are the singular values of ``Qxᵀ Qy`` clamped to ``[0, 1]``. For
    angles near 0 arccos loses precision, so — as ``scipy.linalg.subspace_angles``
    does — angles whose cosine exceeds ``1/√2`` are taken as arcsin of the
    singular values of ``Qy − Qx (Qxᵀ Qy)``. Returns ``(..., min(p, q))``.
    """
    if Qx.shape[-1] < Qy.shape[-1]:
        Qx, Qy = Qy, Qx
    C = Qx.transpose(-1, -2) @ Qy  # (..., p, q), p ≥ q
    cos = torch.linalg.svdvals(C).clamp(0.0, 1.0)  # (..., q) descending
    theta = torch.arccos(cos)
    resid = Qy - Qx @ C  # (..., m, q)
    sin = torch.linalg.svdvals(resid).clamp(0.0, 1.0).flip(-1)  # ascending ↔ matches cos descending
    small = cos ** 2 > 0.5
    return torch.where(small, torch.arcsin(sin), theta)


@full_fp32
def phi(Ux: torch.Tensor, Uy: torch.Tensor, i: int | None = None, j: int | None = None) -> torch.Tensor:
    """LoRA §7 subspace similarity ``φ = ‖U_xⁱᵀ U_yʲ‖_F² / min(i, j)`` in ``[0, 1]``.

    ``Ux (..., d, ≥i)`` and ``Uy (..., d, ≥j)`` have orthonormal columns ordered
    by importance (singular vectors); ``i``/``j`` default to all columns. Equal
    to the mean squared cosine of the principal angles.
    """
    i = Ux.shape[-1] if i is None else i
    j = Uy.shape[-1] if j is None else j
    M = upcast(Ux[..., :i]).transpose(-1, -2) @ upcast(Uy[..., :j])
    return (M ** 2).sum(dim=(-2, -1)) / min(i, j)


@full_fp32
def phi_grid(Ux: torch.Tensor, Uy: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for every ``i ≤ r1``, ``j ≤ r2`` at once (the LoRA §7.2 grid): ``(..., r1, r2)``.

    ``‖U_xⁱᵀ U_yʲ‖_F²`` is the 2-D prefix sum of the squared entries of
    ``U_xᵀ U_y``, so the whole grid costs one product.
    """
    M2 = (upcast(Ux).transpose(-1, -2) @ upcast(Uy)) ** 2  # (..., r1, r2)
    cum = M2.cumsum(-2).cumsum(-1)
    r1, r2 = cum.shape[-2:]
    i = torch.arange(1, r1 + 1, device=cum.device, dtype=cum.dtype).unsqueeze(-1)
    j = torch.arange(1, r2 + 1, device=cum.device, dtype=cum.dtype).unsqueeze(0)
    return cum / torch.minimum(i, j)


def random_phi_expectation(i: int, j: int, d: int) -> float:
    """Expected φ for independent uniformly random subspaces of dims i, j in R^d: ``max(i, j)/d``.

    ``E‖U_iᵀ U_j‖_F² = i·j/d``, divided by ``min(i, j)``.
    """
    return i * j / d / min(i, j)


@full_fp32
def lstsq(
    A: torch.Tensor, B: torch.Tensor, rcond: float | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``A X ≈ B`` for ``X``; returns ``(X, relative residual)``.

    ``A (..., m, n)``, ``B (..., m, k)`` → ``X (..., n, k)``. Square, no
    ``rcond`` given and the solve verified (relative residual ≤ 1e-4 in
    float32, 1e-10 in float64): the exact solve (what CondLoRA's official code
    does with ``W0⁻¹``). Otherwise the minimum-norm least-squares solution through the
    pseudo-inverse with singular values below ``rcond·σ_max`` cut
    (``rcond`` defaults to ``max(m, n)·eps``). The residual is
    ``‖A X − B‖_F / ‖B‖_F`` per batch entry ``(...)``.
    """
    A = upcast(A, dtype)
    B = upcast(B, A.dtype)
    m, n = A.shape[-2:]
    X = None
    if m == n and rcond is None:
        try:
            X = _solve(A, B)
        except RuntimeError:  # singular: fall through to the pseudo-inverse
            X = None
        # LU on a singular or ill-conditioned matrix often returns huge *finite* garbage: accept the
        # exact solve only when it actually solves the system, else take the pseudo-inverse.
        if X is not None and not bool(torch.isfinite(X).all() and (_residual(A, X, B) <= _SOLVE_TOL[A.dtype]).all()):
            X = None
    if X is None:
        eps = torch.finfo(A.dtype).eps
        cut = rcond if rcond is not None else max(m, n) * eps
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        keep = S > cut * S[..., :1]
        Sinv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
        X = Vh.transpose(-1, -2) @ (Sinv.unsqueeze(-1) * (U.transpose(-1, -2) @ B))
    return X, _residual(A, X, B)


#: Largest relative residual ‖AX − B‖/‖B‖ at which an exact solve is trusted.
_SOLVE_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


@full_fp32
def stacked_lstsq(
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], rcond: float | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Least squares over stacked blocks: ``[M_1; …; M_L] X ≈ [Y_1; …; Y_L]``.

    ``M_l (p, q)``, ``Y_l (p, k)`` → ``X (q, k)`` (minimum norm when the stack
    is rank-deficient). Streams: a running thin QR ``[R; M_l] = Q' R'`` keeps
    only ``R (≤q, q)`` and ``Qᵀ Y (≤q, k)``, so memory is one block plus
    ``q²``, never the ``(L·p, q)`` stack; the small final system goes to
    :func:`~lora_lens.linalg.lstsq`. Since the running ``Q`` has orthonormal
    columns, ``R X = Qᵀ Y`` has the same least-squares / minimum-norm solution
    as the stack.
    """
    R = QtY = None
    for M, Y in blocks:
        M, Y = M.to(dtype), Y.to(dtype)
        if R is not None:
            M, Y = torch.cat([R, M]), torch.cat([QtY, Y])  # (≤q + p, q), (≤q + p, k)
        Q, R = torch.linalg.qr(M)  # (rows, ≤q), (≤q, q)
        QtY = Q.T @ Y  # (≤q, k)
    if R is None:
        raise ConfigError("least squares over no layers: nothing to fit.")
    X, _ = lstsq(R, QtY, rcond=rcond)
    return X


def _residual(A: torch.Tensor, X: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``‖A X − B‖_F / ‖B‖_F`` per batch entry."""
    return torch.linalg.matrix_norm(A @ X - B) / torch.linalg.matrix_norm(B).clamp_min(torch.finfo(A.dtype).tiny)


def _solve(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.solve``, one matrix at a time on the CPU.

    Batched LU on the CPU with more than one intra-op thread fails in current
    torch builds (pytorch/pytorch#142815: MKL prints "Parameter 6 was incorrect
    on entry to SLASWP" to *stdout* and the solve raises), so batches are
    looped there; on CUDA the batched call is kept.
    """
    if A.device.type != "cpu" or A.dim() == 2:
        return torch.linalg.solve(A, B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    A2 = A.expand(*batch, *A.shape[-2:]).reshape(-1, *A.shape[-2:])
    B2 = B.expand(*batch, *B.shape[-2:]).reshape(-1, *B.shape[-2:])
    X = torch.stack([torch.linalg.solve(a, b) for a, b in zip(A2, B2)]) if len(A2) else torch.linalg.solve(A2, B2)
    return X.reshape(*batch, *X.shape[-2:])


def random_orthonormal(d: int, k: int, batch: tuple[int, ...] = (), seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Haar-random orthonormal ``(*batch, d, k)`` (QR of a Gaussian), deterministic for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(*batch, d, k, generator=gen, dtype=dtype)
    Q, R = torch.linalg.qr(G)
    return Q * torch.sign(torch.diagonal(R, dim1=-2, dim2=-1)).unsqueeze(-2)
