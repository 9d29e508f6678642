"""The numerical kernels of the range finder (:mod:`lora_lens.randomized`): orthonormal and
LU-normalized bases of skinny blocks, the small SVD of the Ritz step, and products on bf16 weights.

Each works on a stack ``(B, …)`` and picks what is fast on its device; the iteration, its checks
and its stopping rules are in :mod:`lora_lens.randomized`, docs/maths.md §10 has the analysis.
"""

from __future__ import annotations

import numpy as np
import torch

#: ``‖Q₁ᵀQ₁ − I‖_F`` above which CholeskyQR2 hands the block to Householder: at ≤ 1/2,


#: ``κ(Q₁)² ≤ (1 + 1/2)/(1 − 1/2) = 3``, so the second pass is orthonormal to working precision.
GRAM_DEVIATION_MAX = 0.5


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


def lu_basis(X: torch.Tensor) -> torch.Tensor:
    """``P L (B, m, q)`` of a partially pivoted ``X = P L U``: a basis of ``span X`` that is not orthonormal.

    HMT §4.5 (and fbpca) normalize power passes this way: ``L`` is unit lower
    triangular with ``|Lᵢⱼ| ≤ 1``, so its columns stay independent however
    steep the spectrum (what orthonormalization guards against in float32),
    at the cost of one LU of the skinny block (``m q²`` flops, no second
    pass as CholeskyQR2 needs). The row swaps LAPACK returns are applied
    on the host (``q`` swaps per item) and ``L``'s rows copied to their
    places: no dense ``(m, m)`` ``P``.
    """
    B, m, q = X.shape
    if X.device.type == "cpu":
        # one thread: MKL's threaded getrf on a skinny block spent 10× longer than a single thread did with 2
        # threads on a loaded machine (spin-waits), and a batched CPU LU with several threads is the
        # configuration of pytorch/pytorch#142815 (see linalg._solve); this also makes the LU independent of the
        # thread count (the GEMMs' rounding still depends on it)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            LU, piv, _ = torch.linalg.lu_factor_ex(X)
        finally:
            torch.set_num_threads(threads)
    else:
        LU, piv, _ = torch.linalg.lu_factor_ex(X)  # (B, m, q), (B, q); info > 0 (a zero pivot) leaves L valid
    top = LU[..., :q, :]  # only the top (q, q) block holds U: make it L's unit lower triangle, in place
    top.tril_(-1).diagonal(dim1=-2, dim2=-1).fill_(1)
    # LAPACK: row i was swapped with row piv[i] − 1, in order; q scalar swaps per item on the host (a
    # vectorized swap over the batch cost 6× more for one item, the CPU's case)
    perm = np.tile(np.arange(m), (B, 1))
    for b, swaps in enumerate((piv.cpu().numpy() - 1).tolist()):
        p = perm[b]
        for i, j in enumerate(swaps):
            if i != j:
                p[i], p[j] = p[j], p[i]
    rows = torch.from_numpy(perm).to(X.device)
    out = torch.empty_like(LU)
    for b in range(B):  # row i of L goes to row perm[i]: P L
        out[b].index_copy_(0, rows[b], LU[b])
    return out


#: Stored dtypes whose passes may run as they are (:func:`half_passes_apply`).
HALF_PASS_DTYPES = (torch.bfloat16,)


def half_passes_apply(stored: torch.dtype, compute: torch.dtype, device: torch.device) -> bool:
    """Whether the passes no check reads run on the stored bf16 weights (the default of ``half_passes``).

    Yes for bf16 weights with a float32 compute dtype on CUDA, or on a CPU with native bf16
    products (AMX or AVX512-BF16; elsewhere oneDNN emulates them, slower than float32).
    """
    if stored not in HALF_PASS_DTYPES or compute != torch.float32:
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, f, lambda: False)()) for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def half_product(A: torch.Tensor, X: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``A @ X`` for a half-precision ``A (B, a, b)`` (row-major or a transposed view) and ``X (B, b, q)``
    rounded to ``A``'s dtype; accumulated in fp32, returned as ``dt``.

    oneDNN's bf16 product with a transposed left operand ran at a third to half the rate on the CPU
    (4096² × 32: 2.76 vs 0.76 ms; a wide 4096×11008 weight's whole run took 2.2× longer), so a
    transposed ``A`` is taken as ``(Xᵀ Aᵀ)ᵀ`` with ``Xᵀ`` made contiguous: both operands row-major.
    CUDA returns the fp32 accumulator itself (``out_dtype``); oneDNN on the CPU has no such product,
    so its output is rounded to bf16 first — the perturbation :func:`lora_lens.randomized._redo_steep` bounds.
    """
    Xh = X.to(A.dtype)
    if A.stride(-1) != 1:  # a transposed view: (Xᵀ Aᵀ)ᵀ, Aᵀ row-major
        return _product_as(Xh.mT.contiguous(), A.mT, dt).mT
    return _product_as(A, Xh, dt)


def _product_as(A: torch.Tensor, B: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    if A.device.type == "cuda":
        try:
            return torch.bmm(A, B, out_dtype=dt)
        except TypeError:  # a torch without out_dtype
            pass
        except RuntimeError as e:  # or one without this dtype pair; out of memory is not that
            if "out of memory" in str(e):
                raise
    return (A @ B).to(dt)


def small_svd(R: torch.Tensor, values_only: bool = False):
    """SVD (or singular values) of a stack of small square ``R (B, q, q)`` — the finder's Ritz step.

    On the CPU, LAPACK as it is. On CUDA, cuSOLVER's batched ``gesvda`` in float64: the default
    driver loops over the batch for q > 32, and these SVDs took 85–90 % of the GPU's time (32 ×
    2048², k = 64 and 256, torch.profiler on an H200); ``gesvda`` works through the Gram ``RᵀR``,
    so relative accuracy ``u (σ₁/σᵢ)²``, hence float64: ``1e-16 (σ₁/σᵢ)²``, far below float32's
    ``u`` for every ``σᵢ/σ₁ ≥ 1e-4``. Results in ``R``'s dtype.
    """
    if R.device.type != "cuda":
        return torch.linalg.svdvals(R) if values_only else torch.linalg.svd(R)
    R64 = R.double()
    if values_only:
        return torch.linalg.svdvals(R64, driver="gesvda").to(R.dtype)
    return tuple(x.to(R.dtype) for x in torch.linalg.svd(R64, full_matrices=False, driver="gesvda"))
