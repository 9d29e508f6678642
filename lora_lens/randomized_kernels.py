"""The numerical kernels of the range finder (:mod:`lora_lens.randomized`): orthonormal and
LU-normalized bases of skinny blocks, the small SVD of the Ritz step, and products on bf16 weights.

Each works on a stack ``(B, …)`` and picks what is fast on its device; the iteration, its checks
and its stopping rules are in :mod:`lora_lens.randomized`, docs/maths.md §10 has the analysis.
"""

from __future__ import annotations

import numpy as np
import torch

from .precision import full_fp32

#: ``‖Q₁ᵀQ₁ − I‖_F`` above which CholeskyQR2 hands the block to Householder: at ≤ 1/2,


#: ``κ(Q₁)² ≤ (1 + 1/2)/(1 − 1/2) = 3``, so the second pass is orthonormal to working precision.
GRAM_DEVIATION_MAX = 0.5


@full_fp32
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


#: Half passes are on by default on a CPU where a bf16 product took at most this fraction of the float32 one's
#: time (:func:`half_products_fast`): a clear margin, so that timing noise on a loaded machine does not flip the
#: choice (native bf16 measured 0.25–0.5×, emulated bf16 above 1×), and the rounding they add buys real time.
HALF_SPEEDUP_MAX_RATIO = 0.7

_HALF_FAST: dict[str, bool] = {}
#: The measured ``(bf16, float32)`` seconds behind :func:`half_products_fast`'s answer (for benchmarks and reports).
HALF_TIMING: dict[str, tuple[float, float]] = {}


def half_passes_apply(stored: torch.dtype, compute: torch.dtype, device: torch.device) -> bool:
    """Whether the passes no check reads run on the stored bf16 weights (the default of ``half_passes``).

    Yes for bf16 weights with a float32 compute dtype on CUDA, or on a CPU where bf16 products were
    measured faster than float32 ones (:func:`half_products_fast`): decided by timing, not by CPU flags,
    so that no CPU feature (AMX, AVX512-BF16) is assumed to make them fast or slow (issue 20 §11).
    """
    if stored not in HALF_PASS_DTYPES or compute != torch.float32:
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    return half_products_fast()


def half_products_fast() -> bool:
    """Whether a bf16 pass beats a float32 one on this CPU: measured once per process, on one thread.

    A pass's two products on a ``(2048, 1024)`` weight with 32 columns, ``W Z`` and ``Wᵀ Q``, as the finder
    runs them (:func:`half_product` with its conversions vs float32 GEMMs); best of 5 after a warm-up, about
    0.1 s once. On when the bf16 time is ``≤`` :data:`HALF_SPEEDUP_MAX_RATIO` × the float32 time.
    Results differ by the bf16 rounding (docs/maths.md §10) between a process that chose half passes and
    one that did not; pass ``half_passes`` explicitly where that must never happen.
    """
    if "cpu" not in _HALF_FAST:
        # on one thread: the ratio is the kernels' (the ISA's), and a threaded run on a shared machine measured
        # anything from 0.01× to 10× (spin-waits), where one thread gave 0.09–0.17× in every run
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t16, t32 = _time_half_and_float()
        finally:
            torch.set_num_threads(threads)
        HALF_TIMING["cpu"] = (t16, t32)
        _HALF_FAST["cpu"] = t16 <= HALF_SPEEDUP_MAX_RATIO * t32
    return _HALF_FAST["cpu"]


def _time_half_and_float(m: int = 2048, n: int = 1024, q: int = 32, repeats: int = 5) -> tuple[float, float]:
    """Best-of-``repeats`` seconds of one pass pair on the CPU: ``(bf16 as stored, float32)``."""
    import time

    g = torch.Generator().manual_seed(0)
    A = torch.randn(1, m, n, generator=g)
    Ah = A.bfloat16()
    Z, Q = torch.randn(1, n, q, generator=g), torch.randn(1, m, q, generator=g)
    runs = {"half": lambda: (half_product(Ah, Z, torch.float32), half_product(Ah.mT, Q, torch.float32)),
            "float": lambda: (A @ Z, (Q.mT @ A).mT)}
    best = {name: float("inf") for name in runs}
    for name, fn in runs.items():
        fn()  # warm-up: oneDNN's first call builds its kernels
    for _ in range(repeats):  # interleaved, so both see the same load
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best["half"], best["float"]


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


@full_fp32
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
