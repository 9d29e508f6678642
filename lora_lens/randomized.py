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

Normalization between passes (needed in float32: docs/maths.md §10): a pass
no check looks at is LU-normalized (``P L`` of a pivoted LU, HMT §4.5,
:func:`lu_basis`): one LU of the skinny block, a well-conditioned basis of the
same span, not orthonormal. Where the iterate must be orthonormal — at the
checks below, and for the last three iterations of a fixed ``n_iter`` run —
CholeskyQR2 (Yamamoto et al. 2015): Gram ``XᵀX``, Cholesky, triangular
solve, twice — all GEMM-shaped, 10–40× cheaper than Householder QR on skinny
``(m, q)`` blocks on the CPU. When the Gram is too ill-conditioned (``κ(X)``
beyond ≈ ``u^{-1/2}``) Cholesky fails or the first pass leaves ``Q₁`` far
from orthonormal; that item is redone by Householder QR (see
:func:`cholesky_qr2`). ``ortho="cholesky"`` / ``"householder"`` orthonormalize
every pass instead (the references the tests and benchmark compare with).

Accuracy: ``tol=None`` runs exactly ``n_iter`` iterations (the historical
behaviour). Every result carries ``sv_bound``, a bound on the relative error of
``σ̂_1..σ̂_k`` that holds whatever the spectrum (:func:`_sv_bound`: the residuals
of the last two products, which are computed anyway, and ``‖W‖_F``; tight where
the tail beyond the ``q`` columns is small, close to 1 where it is not). With
``tol`` the items are checked after every iteration and stop once that bound is
``≤ tol`` (cap ``max_iter``): never on an estimate, so on slowly decaying or
flat spectra, where nothing can be certified, they run to the cap. ``phi_tol``
also asks the top-k left subspace to settle (``1 − φ`` between successive
iterates). Each item also reports its passes, the last change of σ, an
extrapolated *estimate* of the error still to come (``error``: it fell 10× short
on near-flat spectra, so nothing stops on it), and a probabilistic bound on
``‖W − QQᵀW‖₂`` from a few Gaussian probes (HMT §4.3) that ride along with the
first pass for free.

Accuracy of subspaces: ``subspace_tol`` stops each item once Wedin's bound
on ``1 − φ`` against the exact top-k subspace is met (:func:`_wedin`, from the
product of the next pass, so nearly free); :func:`lora_lens.linalg.top_subspace_svd`
is this finder with that criterion.

Half passes: where bf16 products are fast (CUDA, or a CPU where they were measured faster) and the
weights are stored in bf16, the products no check and no output reads run on the
weights as stored (:func:`half_passes_apply`, ``half_passes``); ``Wᵀ Q`` at checks,
the last ``W Z`` and the probes stay in the compute dtype, and an item whose
``σ̂_k/σ̂_1`` is below bf16's reach is redone without them (:func:`_redo_steep`).
On CUDA the ``q × q`` Ritz SVDs are one batched float64 ``gesvda`` (:func:`small_svd`)
and the unchecked passes use CholeskyQR2. docs/maths.md §10 has the error analysis.

Batching: items are processed ``block`` at a time (default: one at a time on
the CPU, where it measured 1.1–1.25× faster than one batched product over the
stack on a quiet 2-core machine, and upcasts one matrix at a time; the whole
stack elsewhere, where batching saves kernel launches; ``decompose_base``
bounds the stack by its chunk budget). ``Wᵀ Q`` is computed as ``(Qᵀ W)ᵀ`` (:func:`_wt`). Half-precision
input is upcast one block at a time, once. Wide matrices run on their
transposed view. Each item's result depends only on its own matrix and seed,
not on the block size (up to the rounding of batched vs single GEMMs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from .precision import full_fp32
from .randomized_kernels import (  # noqa: F401  (re-exported: the finder's public kernels)
    HALF_PASS_DTYPES, cholesky_qr2, half_passes_apply, half_product, lu_basis, small_svd)

#: HMT (4.3): ``‖E‖₂ ≤ α √(2/π) maxᵢ ‖E ωᵢ‖`` with probability ``≥ 1 − α^{-p}`` for ``p`` Gaussian probes.
PROBE_ALPHA = 10.0

#: Orthonormal (checked) iterations at the end of a fixed-``n_iter`` run: three give the last change of
#: σ and its rate, for the error estimate; the passes before them are LU-normalized.
FIXED_CHECKS = 3


@dataclass(frozen=True, eq=False)
class LowRankSVD:
    """Top-k SVD ``W ≈ U diag(S) Vh`` of a stack, and how it was found.

    ``U (..., m, k)``, ``S (..., k)`` descending, ``Vh (..., k, n)``;
    ``passes (...)``: products with ``W`` or ``Wᵀ`` (``2 + 2·iterations``, one more
    with ``subspace_tol``: the product the last Wedin check reads);
    ``change (...)``: max relative change of ``σ_1..σ_k`` over the last
    iteration (NaN with no iteration); ``error (...)``: an *estimate* (not a
    bound) of the relative error of ``σ_1..σ_k`` still to come, extrapolated
    from the last changes (``change·ρ/(1 − ρ)``, ``ρ`` their ratio; ``inf``
    before three checks); it can fall far short on near-flat spectra, use
    ``sv_bound``;
    ``residual (...)``: probabilistic upper bound of ``‖W − QQᵀW‖₂ / σ̂_1``
    (HMT §4.3, holds with probability ``≥ 1 − 10^{-probes}``; close to the
    Frobenius tail on flat spectra, so loose there; NaN without probes);
    ``fallbacks (...)``: orthonormalizations redone by Householder QR;
    ``subspace_error (...)``: Wedin's bound on ``1 − φ`` of ``U`` against the
    exact top-k left subspace (only with ``subspace_tol``, else NaN);
    ``half_passes (...)``: how many of ``passes`` ran on the stored bf16
    weights (see :func:`range_svd`; 0 without);
    ``sv_bound (...)``: a bound on ``max_{i≤k} |σ_i − σ̂_i| / σ_i`` against the
    exact ``σ_i`` of ``W`` as given, that holds for any spectrum (:func:`_sv_bound`);
    below 1 (near 1: nothing certified), ``inf`` where no bound is known (a ``σ̂_i``
    at rounding level, or a result built without one), 0 for an exact SVD.
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
    subspace_error: torch.Tensor
    half_passes: torch.Tensor | None = None
    sv_bound: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.half_passes is None:
            object.__setattr__(self, "half_passes", torch.zeros_like(self.passes))
        if self.sv_bound is None:  # built without one: no bound known
            object.__setattr__(self, "sv_bound", torch.full(self.passes.shape, math.inf, dtype=self.S.dtype,
                                                            device=self.S.device))

    def __iter__(self):
        return iter((self.U, self.S, self.Vh))

    def __getitem__(self, i):
        return (self.U, self.S, self.Vh)[i]

    def __len__(self) -> int:
        return 3


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


#: ``σ̂_k / σ̂_1`` below which a half-pass item is redone in the compute dtype: 4 u_bf16 (u = 2⁻⁸), so the
#: rounding of a bf16 pass stays a quarter of ``σ_k`` (measured: equal accuracy down to ``σ_k/σ_1`` = 1e-2).
HALF_PASS_MIN_RATIO = 2.0 ** -6


#: Orthonormalizations: ``lu`` (LU-normalized passes, CholeskyQR2 where an orthonormal iterate is
#: needed), ``cholesky`` (CholeskyQR2 after every pass), ``householder`` (Householder QR every pass).
ORTHO = ("lu", "cholesky", "householder")


@full_fp32
def range_svd(
    W: torch.Tensor,
    k: int,
    *,
    oversample: int = 16,
    n_iter: int = 4,
    tol: float | None = None,
    max_iter: int = 32,
    phi_tol: float | None = None,
    subspace_tol: float | None = None,
    check_every: int = 1,
    seed: int | Sequence[int] = 0,
    dtype: torch.dtype | None = None,
    probes: int = 4,
    ortho: str | None = None,
    householder: bool = False,
    block: int | None = None,
    half_passes: bool | None = None,
) -> LowRankSVD:
    """Top-``k`` SVD of ``W (..., m, n)`` by the range finder above; signs *not* fixed.

    ``q = min(k + oversample, m, n)`` columns. Fixed mode (no ``tol`` nor
    ``subspace_tol``): ``n_iter`` power iterations. Adaptive: iterate until
    every given criterion holds, at most ``max_iter`` — ``tol``: the bound
    ``sv_bound`` on the relative error of ``σ_1..σ_k`` ``≤ tol`` (never an
    estimate: on spectra nothing certifies, the cap is reached); ``phi_tol``:
    ``1 − φ`` of the top-k left subspace between checks ``≤ phi_tol``;
    ``subspace_tol``: Wedin's bound on ``1 − φ`` against the *exact* top-k
    left subspace ``≤ subspace_tol`` (see :func:`_wedin`). Checks run every
    ``check_every`` iterations (the passes in between are LU-normalized).
    ``probes`` Gaussian probes give the residual bound (0: none).
    ``ortho``: see :data:`ORTHO` (``householder=True`` is ``ortho="householder"``; default ``lu`` on
    the CPU, ``cholesky`` elsewhere: on CUDA the LU's row swaps go through the host, and CholeskyQR2
    was 1.05–1.3× faster there on the benchmark's groups).
    ``block``: items per batched product (default: 1 on the CPU, all of them elsewhere).
    ``half_passes``: run the products no check and no output reads on ``W`` as stored (bf16 only,
    else ``ValueError``); ``None``: :func:`half_passes_apply`. Items with ``σ̂_k/σ̂_1`` below
    :data:`HALF_PASS_MIN_RATIO` are redone without them (:func:`_redo_steep`).
    Wide matrices (``m < n``) are run transposed (a view), so ``Ω`` is on the smaller side.
    """
    if householder:
        ortho = "householder"
    if ortho is None:
        ortho = "lu" if W.device.type == "cpu" else "cholesky"
    if ortho not in ORTHO:
        raise ValueError(f"ortho={ortho!r}; expected one of {list(ORTHO)}.")
    *batch, m, n = W.shape
    q = min(k + oversample, m, n)
    k = min(k, q)
    dt = compute_dtype(W.dtype, dtype)
    shape = tuple(batch)
    half = half_passes_apply(W.dtype, dt, W.device) if half_passes is None else bool(half_passes)
    if half and W.dtype not in HALF_PASS_DTYPES:
        raise ValueError(f"half_passes needs weights stored in {[str(d) for d in HALF_PASS_DTYPES]}, not {W.dtype}.")
    if k < 0:
        raise ValueError(f"k={k}; expected the number of singular triplets, k >= 0.")
    W3 = W.reshape(-1, m, n)  # a view for a contiguous stack
    L = W3.shape[0]
    if L == 0 or k == 0:  # nothing to find: no pass run
        return _nothing(shape, m, n, k, dt, W.device)
    wide = m < n
    if wide:  # Wᵀ = V Σ Uᵀ: the same finder on the (n, m) view, factors swapped at the end
        W3 = W3.mT
    omega, probe = sketches(L, W3.shape[-1], q, probes, seed, dt)
    step = block or (1 if W.device.type == "cpu" else L)  # measured: see the module docstring
    parts, buf = [], None
    stop = (n_iter, tol, max_iter, phi_tol, subspace_tol, check_every, ortho)
    for lo in range(0, L, step):
        Wh = Wb = W3[lo: lo + step]
        if Wb.dtype != dt:  # upcast one block into one reused buffer (same strides as the block's view):
            # a fresh buffer per block costs its first-touch page faults, 4× the copy itself (4096², CPU)
            buf = torch.empty_like(Wb, dtype=dt) if buf is None else buf
            Wb = buf[: Wb.shape[0]].copy_(Wb)
        om, pr = omega[lo: lo + step].to(W.device), probe[lo: lo + step].to(W.device)
        part = _finder_block(Wb, Wh if half else None, om, pr, k, *stop)
        parts.append(_redo_steep(part, k, Wb, om, pr, stop) if half else part)
        del Wb, Wh
    U, S, Vh, passes, change, error, residual, fallbacks, wedin, halves, bound = (torch.cat(p) for p in zip(*parts))
    if wide:
        U, Vh = Vh.mT, U.mT
    return LowRankSVD(U.reshape(*shape, m, k), S.reshape(*shape, k), Vh.reshape(*shape, k, n),
                      *(t.reshape(shape) for t in (passes, change, error, residual, fallbacks, wedin, halves, bound)))


def _redo_steep(part: tuple, k: int, W: torch.Tensor, omega: torch.Tensor, probe: torch.Tensor,
                stop: tuple) -> tuple:
    """Items of a half-pass block whose ``σ̂_k < HALF_PASS_MIN_RATIO σ̂_1``, redone in the compute dtype.

    A bf16 product rounds ``W Z`` to ``u = 2⁻⁸`` of its entries, a white perturbation of ``u σ_1``
    size: harmless while ``σ_k ≫ u σ_1`` (the passes after it damp it), not on spectra that fall
    by more than that inside the top k (docs/maths.md §10). ``σ̂_k`` of the Ritz values is a lower
    bound of ``σ_k``, so the test errs toward redoing.
    """
    S, halves = part[1], part[-1]
    steep = (S[:, k - 1] < HALF_PASS_MIN_RATIO * S[:, 0]) & (halves > 0)
    if not bool(steep.any()):
        return part
    idx = steep.nonzero().squeeze(-1)
    for t, r in zip(part, _finder_block(W[idx], None, omega[idx], probe[idx], k, *stop)):
        t[idx] = r
    return part


def _nothing(batch: tuple[int, ...], m: int, n: int, k: int, dt: torch.dtype, device) -> LowRankSVD:
    """The result of a run with no pass: zero factors (empty when ``k`` or the batch is 0), no passes, NaN estimates."""
    f, zero = dict(dtype=dt, device=device), torch.zeros(batch, dtype=torch.long, device=device)
    nan = torch.full(batch, math.nan, **f)
    # no value to be wrong: the σ bound is 0 (k = 0) or empty
    return LowRankSVD(torch.zeros(*batch, m, k, **f), torch.zeros(*batch, k, **f), torch.zeros(*batch, k, n, **f),
                      zero, nan, nan, nan, zero, nan, sv_bound=torch.zeros(batch, **f))


def _finder_block(W: torch.Tensor, Wh: torch.Tensor | None, omega: torch.Tensor, probe: torch.Tensor, k: int,
                  n_iter: int,
                  tol: float | None, max_iter: int, phi_tol: float | None, subspace_tol: float | None,
                  check_every: int, ortho: str):
    """One block ``W (B, m, n)`` in the compute dtype; see :func:`range_svd`.

    ``Wh``: the same block as stored (bf16) for the passes no check reads (``None``: every pass on ``W``).
    """
    B, q, p = W.shape[0], omega.shape[-1], probe.shape[-1]
    dev, dt = W.device, W.dtype
    tiny = torch.finfo(dt).tiny
    adaptive = tol is not None or subspace_tol is not None
    fallbacks = torch.zeros(B, dtype=torch.long, device=dev)
    halves = torch.zeros(B, dtype=torch.long, device=dev)

    def orth(X):
        Qx, Rx, bad = cholesky_qr2(X, ortho == "householder")
        fallbacks.add_(bad.long())
        return Qx, Rx

    def normalize(X):  # a pass no check looks at: any well-conditioned basis of its span will do
        return lu_basis(X) if ortho == "lu" else orth(X)[0]

    Yp = None  # (B, m, p) = W P, independent of every Q below: rides along with the first exact product

    def mul(Z, exact, active=None):  # W Z (B, m, q)
        nonlocal Yp
        if Wh is None or exact:
            if Yp is None and p:
                Y = W @ torch.cat([Z, probe], -1)
                Yp = Y[..., Z.shape[-1]:]
                return Y[..., : Z.shape[-1]]
            return W @ Z
        halves.add_(1 if active is None else active.long())
        return half_product(Wh, Z, dt)

    def mult(Q, exact, active=None):  # Wᵀ Q (B, n, q)
        if Wh is None or exact:
            return _wt(W, Q)
        halves.add_(1 if active is None else active.long())
        return half_product(Wh.mT, Q, dt)

    def ritz(Q, R):
        """Top-k σ of ``Qᵀ W = Rᵀ Zᵀ``, and (for φ or Wedin) the small factors ``(Ur, Σ, Vr)`` of ``Rᵀ``."""
        if phi_tol is None and subspace_tol is None:
            return small_svd(R, values_only=True)[..., :k], None
        Ur, sv, Vrh = small_svd(R.mT)
        return sv[..., :k], (Ur, sv, Vrh.mT, Q)

    # which iterations end orthonormal (checked): adaptive every check_every; fixed: the last three
    # (the change of σ and its rate for the error estimate), all others LU-normalized
    if adaptive:
        checked = lambda it: it % check_every == 0 or it == max_iter  # noqa: E731
    else:
        checked = lambda it: it > n_iter - FIXED_CHECKS  # noqa: E731
    # iterations whose Q may become the result's U: a check may stop there (adaptive), or the last one (fixed)
    final = checked if adaptive else (lambda it: it == n_iter)  # noqa: E731
    # ‖W‖_F² once per item: the complement term of the σ bound (:func:`_sv_bound`); one read of W
    fro2 = torch.linalg.vector_norm(W, dim=(-2, -1)) ** 2  # (B,)
    inf = torch.full((B,), math.inf, dtype=dt, device=dev)
    Y = mul(omega, final(0))  # (B, m, q)
    if checked(0):
        Q, Rp = orth(Y)  # (B, m, q); W Ω = Q Rp
        P = mult(Q, True)  # (B, n, q) = Wᵀ Q
        Z, R = orth(P)  # (B, n, q); Qᵀ W = Rᵀ Zᵀ
    else:
        Q = normalize(Y)
        Z, R = normalize(mult(Q, False)), None
    del Y
    active = torch.ones(B, dtype=torch.bool, device=dev)
    iters = torch.zeros(B, dtype=torch.long, device=dev)
    nan = torch.full((B,), math.nan, dtype=dt, device=dev)
    change = last_change = last_ratio = wedin = nan
    remaining = sv_bound = inf
    sv_prev, sub_prev = ritz(Q, R) if checked(0) else (None, None)
    if final(0):
        sv_bound = _sv_bound(fro2, omega, Rp, P, sv_prev, k, W.shape[-2], False)
        del P
    for it in range(1, (max_iter if adaptive else n_iter) + 1):
        # (B, m, q): in the compute dtype where its Q may be the result's, or Wedin reads it after a check
        Y = mul(Z, final(it) or (subspace_tol is not None and checked(it - 1)), active)
        if subspace_tol is not None and sub_prev is not None and checked(it - 1):
            # the last check's Ritz vectors are judged by this product, before it moves them
            wedin = torch.where(active, _wedin(Y, sub_prev, k), wedin)
            ok = (wedin <= subspace_tol) & _sv_ok(sv_bound, tol)
            active = active & ~ok
            if not bool(active.any()):
                break
        if checked(it):
            Qn, Rp = orth(Y)  # (B, m, q); W Z = Qn Rp
            P = mult(Qn, True)  # (B, n, q) = Wᵀ Qn
            Zn, Rn = orth(P)  # (B, n, q): R gives the Ritz values a check reads
        else:
            Qn = normalize(Y)
            Zn, Rn = normalize(mult(Qn, False, active)), R
        del Y
        Zp = Z  # the basis W multiplied: with Qn, Rp, P, the residuals of the σ bound
        Q, Z = _keep(active, Qn, Q), _keep(active, Zn, Z)
        R = Rn if R is None else _keep(active, Rn, R)
        iters = torch.where(active, it, iters)
        if not checked(it):
            continue
        sv, sub = ritz(Q, R)
        if final(it):  # σ of an iterate that may be the result's: bound their error (and stop on it)
            sv_bound = torch.where(active, _sv_bound(fro2, Zp, Rp, P, sv, k, W.shape[-2], checked(it - 1)), sv_bound)
        del P, Zp
        if sv_prev is not None:
            rel = ((sv - sv_prev).abs() / sv.clamp_min(tiny)).amax(-1)
            last_change, change = change, torch.where(active, rel, change)
            # linear convergence: the error left ≈ Σ_{j≥1} change ρʲ, ρ = ratio of successive changes
            # (inf until two changes are known; a ratio ≥ 1, not yet in the linear regime, is capped at 0.99)
            ratio = change / last_change
            rho = torch.fmax(ratio, last_ratio).clamp(max=0.99)  # the slower of the last two rates
            last_ratio = torch.where(active, ratio, last_ratio)
            est = torch.nan_to_num(change * rho / (1 - rho), nan=math.inf)
            remaining = torch.where(active, est, remaining)
        if adaptive and subspace_tol is None:
            ok = _sv_ok(sv_bound, tol)
            if phi_tol is not None:
                ok &= (1 - _phi_successive(sub, sub_prev, k)) <= phi_tol
            active = active & ~ok
            if not bool(active.any()):
                break
        sv_prev, sub_prev = sv, sub
    if subspace_tol is not None and bool(active.any()):  # the cap: judge the final iterate by one more product
        wedin = torch.where(active, _wedin(W @ Z, ritz(Q, R)[1], k), wedin)
    # Qᵀ W = Rᵀ Zᵀ, Rᵀ = Ur Σ Vrᵀ  ⇒  W ≈ (Q Ur) Σ (Z Vr)ᵀ
    Ur, S, Vrh = small_svd(R.mT)
    U = Q @ Ur[..., :k]  # (B, m, k)
    Vh = Vrh[..., :k, :] @ Z.mT  # (B, k, n)
    S = S[..., :k]
    if p:
        Yp = W @ probe if Yp is None else Yp
        E = Yp - Q @ (Q.mT @ Yp)  # (B, m, p) = (I − QQᵀ) W P
        bound = PROBE_ALPHA * math.sqrt(2 / math.pi) * torch.linalg.vector_norm(E, dim=-2).amax(-1)
        residual = torch.where(S[..., 0] > 0, bound / S[..., 0].clamp_min(tiny), 0.0)
    else:
        residual = torch.full((B,), math.nan, dtype=dt, device=dev)
    # with subspace_tol, the product the last Wedin check read (in the loop or at the cap) is one more pass
    passes = 2 + 2 * iters + (subspace_tol is not None)
    return U, S, Vh, passes, change, remaining, residual, fallbacks, wedin, halves, sv_bound


def _wt(W: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``Wᵀ Q (B, n, q)`` computed as ``(Qᵀ W)ᵀ``: a view of the product in the orientation BLAS runs
    fastest here (1.3–1.5× the rate of ``W.mT @ Q`` for q ≤ 80 with MKL, bench_finder.py)."""
    return (Q.mT @ W).mT


def _sv_ok(sv_bound: torch.Tensor, tol: float | None) -> torch.Tensor:
    """Items whose σ bound (:func:`_sv_bound`) is within ``tol`` (all of them without ``tol``).

    Only the bound decides: the extrapolated ``error`` is an estimate, and on near-flat spectra it
    fell an order of magnitude short of the true error (issue 20 §10), so no stop rests on it.
    """
    if tol is None:
        return torch.ones_like(sv_bound, dtype=torch.bool)
    return sv_bound <= tol


def _sv_bound(fro2: torch.Tensor, Zp: torch.Tensor, Rp: torch.Tensor, P: torch.Tensor, sv: torch.Tensor, k: int,
              m: int, orthonormal: bool) -> torch.Tensor:
    """A bound on ``max_{i≤k} |σ_i − σ̂_i| / σ_i`` that holds whatever the spectrum: ``(B,)``, ``inf`` = no bound.

    Inputs of one check: ``W Zp = Q Rp`` (``Zp (B, n, q)`` any basis, ``Q (B, m, q)`` orthonormal),
    ``P = Wᵀ Q (B, n, q)``, ``fro2 = ‖W‖_F²``, ``sv = σ̂_1..σ̂_k`` the reported values ``σ(Qᵀ W)``;
    ``orthonormal``: ``Zp`` came from an orthonormalization (then ``T = I``, no Gram).

    With ``Zp = Z̃ T`` (``T`` the Cholesky factor of ``ZpᵀZp``, ``Z̃`` orthonormal), ``W Z̃ = Q R̃``,
    ``R̃ = Rp T⁻¹ = Ũ Σ' Ṽᵀ``. The pairs ``U' = Q Ũ``, ``V' = Z̃ Ṽ`` satisfy ``W V' = U' Σ'`` exactly,
    so in the bases ``[U' U'⊥]``, ``[V' V'⊥]``::

        W = [[Σ'_k, 0,      F_k  ],        F = (Wᵀ U' − V' Σ')ᵀ restricted to V'⊥,
             [0,    Σ'_rest, F_r  ],        ‖F‖ = ‖(P − Z̃ R̃ᵀ) Ũ‖ (the other residual, no pass)
             [0,    0,      W₃₃  ]]        ‖W₃₃‖₂ ≤ ‖W₃₃‖_F = √(‖W‖_F² − ‖QᵀW‖_F²) = √(fro2 − ‖P‖_F²)

    Dropping ``F_k`` moves every σ by at most ``‖F_k‖₂`` (Weyl), and what is left is block diagonal
    ``diag(Σ'_k, W₂₂)`` with ``‖W₂₂‖₂ ≤ c = ‖[[σ'_{k+1}, ‖F_r‖₂], [0, ‖W₃₃‖_F]]‖₂``. Hence
    ``σ_i ≤ max(σ'_i, c) + ‖F_k‖₂``, and ``σ'_i ≤ σ̂_i ≤ σ_i`` (both are compressions of ``W``):
    ``0 ≤ σ_i − σ̂_i ≤ B_i = max(σ'_i, c) + ‖F_k‖₂ − σ̂_i``. The bound is tight where the tail
    beyond the ``q`` columns is small in Frobenius norm (low rank plus noise, steep spectra); where
    it is not (``c > σ̂_i``: slowly decaying spectra, flat ones), it honestly says ``O(1)``: no
    subspace method can rule out a missed direction there without touching the rest of ``W``.

    Rounding: ``ρ = 16 √q u σ̂_1`` is added to ``B_i`` (and ``σ̂_i`` may exceed ``σ_i`` by it: the
    rounding of the last products and of ``Q``'s orthonormality; measured in float32 at most 11 u σ̂_1
    at 600×400, 2048² and 4096×1024, converged, whereas ``ρ`` ≥ 90 u σ̂_1 for q ≥ 32), ``2 √q u ‖Rp‖_F +
    u ‖P‖_F`` to ``‖F‖`` when it is formed in the compute dtype, and
    ``(2 √(m q) + 8) u ‖W‖_F²`` to ``‖W₃₃‖_F²`` (the cancellation in ``fro2 − ‖P‖_F²``). The bound
    returned is ``max_i max(B_i / (σ̂_i + B_i), ρ / (σ̂_i − ρ))`` (``σ_i`` above ``σ̂_i``, or below by
    rounding): below 1 unless rounding dominates, close to 1 where nothing is known; ``inf`` where
    ``σ̂_i ≤ ρ`` (a value at rounding level has no relative accuracy) or ``Zp`` is singular.
    """
    dt, f64 = sv.dtype, torch.float64
    n, q = P.shape[-2:]
    u = torch.finfo(dt).eps / 2
    p2 = torch.linalg.matrix_norm(P.to(f64)) ** 2  # ‖QᵀW‖_F²
    if orthonormal:  # Zp from an orthonormalization: Z̃ = Zp, T = I; F in the compute dtype (one (n, q, q)
        # GEMM: in float64 it took most of the bound's time), its rounding added to ‖F‖ below
        F = (P - Zp @ Rp.mT).to(f64)  # (B, n, q)
        f_err = 2 * math.sqrt(q) * u * torch.linalg.matrix_norm(Rp.to(f64)) + u * p2.sqrt()
        Rp, sv, fro2 = Rp.to(f64), sv.to(f64), fro2.to(f64)
        Rt, info = Rp, torch.zeros(fro2.shape, dtype=torch.int32, device=fro2.device)
    else:
        Rp, P, sv, fro2, Zp = Rp.to(f64), P.to(f64), sv.to(f64), fro2.to(f64), Zp.to(f64)
        f_err = torch.zeros_like(fro2)
        T, info = torch.linalg.cholesky_ex(Zp.mT @ Zp, upper=True)  # (B, q, q)
        Rt = torch.linalg.solve_triangular(T, Rp, upper=True, left=False)  # R̃ = Rp T⁻¹
        F = P - Zp @ torch.cholesky_solve(Rp.mT, T, upper=True)  # (B, n, q)
    Ut, s1, _ = small_svd(Rt)  # (B, q, q), (B, q); on CUDA the batched float64 gesvda
    # F Ũ = Wᵀ U' − V' Σ', through its (q, q) Gram: one GEMM, no SVD of an (n, q) block
    G = Ut.mT @ (F.mT @ F) @ Ut  # (B, q, q)
    # ‖F_k‖₂, ‖F_r‖₂; + the eigensolver's absolute error (a few u₆₄ ‖G‖), so a tiny λ is not understated
    slack = 8 * torch.finfo(f64).eps * torch.linalg.matrix_norm(G)
    nk = (torch.linalg.eigvalsh(G[..., :k, :k])[..., -1] + slack).clamp_min(0).sqrt() + f_err
    nr = (torch.linalg.eigvalsh(G[..., k:, k:])[..., -1] + slack).clamp_min(0).sqrt() + f_err if q > k else \
        torch.zeros_like(nk)
    a = s1[..., k] if q > k else torch.zeros_like(nk)
    tail2 = (fro2 - p2).clamp_min(0) + (2 * math.sqrt(m * q) + 8) * u * fro2
    # ‖[[a, b], [0, t]]‖₂ of the block norms
    a2, b2, t2 = a ** 2, nr ** 2, tail2
    tr = a2 + b2 + t2
    c = ((tr + (tr ** 2 - 4 * a2 * t2).clamp_min(0).sqrt()) / 2).sqrt()  # (B,)
    rho = 16 * math.sqrt(q) * u * sv[..., :1]  # (B, 1)
    Bi = (torch.maximum(s1[..., :k], c[..., None]) + nk[..., None] - sv).clamp_min(0) + rho  # (B, k)
    # σ_i ≥ σ̂_i: (σ_i − σ̂_i)/σ_i ≤ B_i/(σ̂_i + B_i) < 1; σ_i ∈ [σ̂_i − ρ, σ̂_i): ≤ ρ/(σ̂_i − ρ)
    below = torch.where(sv > rho, rho / (sv - rho).clamp_min(torch.finfo(f64).tiny), math.inf)
    rel = torch.maximum(Bi / (sv + Bi), below).amax(-1)
    ok = (info == 0) & torch.isfinite(rel)
    return torch.where(ok, rel, math.inf).to(dt)


def _wedin(Y: torch.Tensor, sub: tuple, k: int) -> torch.Tensor:
    """Wedin's bound on ``1 − φ(U_k, U_k^exact)`` for the Ritz triplets ``sub`` of one check, given ``Y = W Z``.

    ``U_k = Q Ur_k``, ``V_k = Z Vr_k`` satisfy ``Wᵀ U_k = V_k Σ_k`` exactly (``Wᵀ Q = Z R``), so
    only ``Res = W V_k − U_k Σ_k = Y Vr_k − Q Ur_k Σ_k (m, k)`` is left, from the product the
    next pass computes anyway; ``‖sin Θ‖_F ≤ ‖Res‖_F / δ`` with the gap ``δ = σ_k − σ_{k+1}``
    (Ritz estimates, so ``q > k`` is needed), and ``1 − φ = ‖sin Θ‖_F² / k``. ``(B,)``, at most 1.
    """
    Ur, sv, Vr, Q = sub
    res = Y @ Vr[..., :k] - Q @ (Ur[..., :k] * sv[..., None, :k])  # (B, m, k)
    gap = (sv[..., k - 1] - sv[..., k]).clamp_min(torch.finfo(sv.dtype).tiny) if sv.shape[-1] > k else \
        torch.full_like(sv[..., 0], torch.finfo(sv.dtype).tiny)
    return ((torch.linalg.matrix_norm(res) / gap) ** 2 / k).clamp(max=1.0)


def _keep(active: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for items still iterating, ``old`` for converged ones (so a batch = its items alone)."""
    if bool(active.all()):
        return new
    return torch.where(active[:, None, None], new, old)


def _phi_successive(cur: tuple, prev: tuple, k: int) -> torch.Tensor:
    """φ between top-k left subspaces ``Q Ur_k`` of two iterations, from the small factors: ``(B,)``."""
    (Ur, _, _, Q), (Ur0, _, _, Q0) = cur, prev
    M = Ur[..., :k].mT @ (Q.mT @ Q0) @ Ur0[..., :k]  # (B, k, k) = U_kᵀ U_k⁰
    return (M ** 2).sum((-2, -1)) / k
