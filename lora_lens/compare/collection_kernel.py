"""The per-module kernel of a collection: one module across its adapters → a small :class:`ModuleResult`.

For every module present in at least two adapters, and for each of its ``N``
(those that have it) updates ``ΔW_i = s_i B_i A_i = U_i diag(S_i) V_iᵀ``
(factored SVD, :func:`~lora_lens.linalg.factored_svd`; ΔW never formed):

- **similarity**, both sides: ``φ_out,ij = ‖U_iᵏᵀ U_jᵏ‖_F² / k`` over the
  top-``k`` output (left) directions and ``φ_in,ij`` the same over the input
  (right) ones — LoRA §7's φ, with the pair's own ``k = min(k_i, k_j)``,
  ``k_i = min(r_i, m, n, top_k)`` (docs/maths.md §2, one φ per pair: the same
  number :func:`~.similarity.adapter_similarity` gives, whatever else is in the
  collection). The aggregate picks the side (``settings.side``; ``both`` = the mean).
  Random baseline per pair and side: ``k/d`` expected, and the mean and spread of φ
  between Haar-random ``k``-dim subspaces of ``R^d`` (:mod:`.baselines`).
- **shared basis**: the top-``R`` left singular vectors of the stacked
  factors ``F = [U_1 S_1 | … | U_N S_N] (m, N·r)`` — the column space of
  ``[ΔW_1 | … | ΔW_N]``, CoRA's common subspace of several sources
  (:func:`~lora_lens.linalg.top_left_subspace`) — and the same on the right
  with ``V_i S_i``. Per adapter: the fraction of ``‖ΔW_i‖²`` captured by the
  left basis, ``‖U_Rᵀ ΔW_i‖²``, by the right basis, and by both,
  ``‖U_Rᵀ ΔW_i V_R‖²`` (ΔW_i stored as ``R × R`` coefficients), for every
  ``R`` up to the curve's end.

Cost, per module and side (``d`` = m or n, ``r`` the rank, ``X = [U_1 | … |
U_N] (d, N·r)``):

- naive: N²/2 pairs, each ``U_iᵀ U_j`` a separate ``(r, d)·(d, r)`` call —
  ``d·r²·N²`` flops in N²/2 tiny GEMMs that run far below peak (and the usual
  tools first form each ``ΔW (m, n)`` and take its full SVD, ``O(m·n·min(m,n))``
  per adapter *per pair*).
- here: one QR per adapter's factors (``O((m+n)·r²)``, batched), then one
  Gram ``G = Xᵀ X (N·r, N·r)``: the same ``d·(N·r)²`` flops in a few large
  GEMMs near peak — and only its upper block triangle is computed (about
  half the flops, :func:`_gram`); φ_ij is the sum of squares of the top-left
  ``(k, k)`` corner of block ``(i, j)`` of ``G``, ``k`` per pair (:func:`_pair_phi`:
  one pass per distinct ``k``; adapters of one rank cost what a single ``k`` did;
  in row blocks, each k's rows meet only the adapters that reach it).
  The shared basis reuses ``G``: ``Fᵀ F = D G D`` (``D = diag(S)``), whose top
  eigenvectors ``W`` give ``U_R = F W / σ``. When ``N·r > d`` the smaller ``F Fᵀ (d, d)`` is used instead and ``G`` is
  formed in row blocks. Memory: the stacked factors plus ``min(N·r, d)²``
  (at most one base weight's size), whatever ``N``.

This runs on a worker (in this process, or on Dask, :mod:`lora_lens.dist`):
:func:`module_task` takes a picklable :class:`~.collection_plan.ModuleTask`,
reads the files itself (header + two tensors per file, :mod:`lora_lens.io.lazy`)
and returns float64 CPU tensors of size ``O(p² + p·R)``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..compute import resolve_device
from ..errors import ConfigError
from ..io.lazy import index_once
from ..linalg import factored_svd, phi, top_left_subspace
from ..precision import full_fp32
from ..spectra import spectrum_metrics
from .baselines import sampled_phi_grid
from .collection_plan import CollectionSettings, ModuleTask


@dataclass(frozen=True, eq=False)
class ModuleResult:
    """One module's small result (float64, on the CPU); rows in ``members`` order.

    ``ks (p,)``: the directions each member brings, ``min(r_i, m, n, top_k)``; pair ``(i, j)``
    compares ``min(k_i, k_j)`` (:attr:`pair_k`). ``phi_out``/``phi_in`` ``(p, p)``: φ on the output
    (left) and input (right) side; ``norms``, ``effective_rank`` ``(p,)``; ``random[side][k]``: mean and
    standard deviation of φ between Haar-random ``k``-dim subspaces on ``side`` (``out``, ``in``), for
    every ``k`` a pair compares (:meth:`random_on` spreads them over the pairs);
    ``sv_left``/``sv_right`` ``(R_c,)`` the stacked factors' singular values;
    ``energy_left``/``_right``/``_both`` ``(p, R_c)`` the captured fraction of each ‖ΔW_i‖² for
    ``R = 1..R_c``; ``basis_left (m, R)``/``basis_right (n, R)`` only with ``keep_basis``.
    """

    name: str
    module_type: str
    shape: tuple[int, int]
    members: tuple[int, ...]
    ks: tuple[int, ...]
    shared_rank: int
    phi_out: torch.Tensor
    phi_in: torch.Tensor
    norms: torch.Tensor
    effective_rank: torch.Tensor
    random: dict
    sv_left: torch.Tensor
    sv_right: torch.Tensor
    energy_left: torch.Tensor
    energy_right: torch.Tensor
    energy_both: torch.Tensor
    basis_left: torch.Tensor | None = None
    basis_right: torch.Tensor | None = None
    #: The module's path in the first adapter that has it (what PEFT wraps), and its base layout.
    module_path: str = ""
    layout: str = "linear"

    @property
    def pair_k(self) -> torch.Tensor:
        """``(p, p)`` int: the directions pair ``(i, j)`` compares, ``min(k_i, k_j)``."""
        k = torch.tensor(self.ks)
        return torch.minimum(k[:, None], k[None, :])

    def phi_on(self, side: str) -> torch.Tensor:
        """``(p, p)`` φ on ``side``: ``out``, ``in``, or ``both`` (their mean)."""
        if side == "out":
            return self.phi_out
        if side == "in":
            return self.phi_in
        if side != "both":
            _bad_side(side)
        return 0.5 * (self.phi_out + self.phi_in)

    def random_on(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, variance, expected)`` ``(p, p)`` of φ between random subspaces of each pair's ``k`` on ``side``
        (``both``: of the mean of two independent sides); expected ``k/d``."""
        if side == "both":
            (mo, vo, eo), (mi, vi, ei) = self.random_on("out"), self.random_on("in")
            return 0.5 * (mo + mi), 0.25 * (vo + vi), 0.5 * (eo + ei)
        if side not in ("out", "in"):
            _bad_side(side)
        kij = self.pair_k
        mean, var = (torch.zeros(kij.shape, dtype=torch.float64) for _ in range(2))
        for k, (mu, sd) in self.random[side].items():
            mean[kij == k], var[kij == k] = mu, sd ** 2
        d = self.shape[0] if side == "out" else self.shape[1]
        return mean, var, kij.double() / d


def _bad_side(side: str):
    raise ConfigError(f"unknown side {side!r}; expected out, in or both.")


@full_fp32
def module_task(task: ModuleTask) -> ModuleResult:
    """Compute one module across its adapters (see the module docstring); reads the files itself."""
    st = task.settings
    cp = st.compute
    dev, dt = (resolve_device(st.worker_device) if st.worker_device else cp.device), cp.dtype
    m, n = task.shape
    p, rmax = len(task.paths), max(task.ranks)
    # Dimension-major (d, p, r): ``reshape(d, p·r)`` is then the adapter-major stack X of every product
    # below as a view, not a second copy. Zero columns past each rank add nothing to any product.
    U = torch.zeros(m, p, rmax, device=dev, dtype=dt)
    V = torch.zeros(n, p, rmax, device=dev, dtype=dt)
    S = torch.zeros(p, rmax, device=dev, dtype=dt)
    by_rank: OrderedDict[int, list[int]] = OrderedDict()
    for i, r in enumerate(task.ranks):
        by_rank.setdefault(r, []).append(i)
    for r, idx_r in by_rank.items():
        # A few adapters at a time: the upcast factors and the QR outputs stay a small fraction of U and V.
        for lo in range(0, len(idx_r), SVD_GROUP):
            idx = idx_r[lo: lo + SVD_GROUP]
            mods = [_read(task.paths[i], task.names[i]) for i in idx]
            B = torch.stack([x.B for x in mods]).to(dev)  # (g, m, r)
            A = torch.stack([x.A for x in mods]).to(dev)  # (g, r, n)
            s = torch.tensor([x.scaling for x in mods], dtype=dt, device=dev)
            u, sv, vh = factored_svd(B, A, s, dtype=dt)  # (g, m, c), (g, c), (g, c, n), c = min(r, m, n)
            c = sv.shape[-1]
            ix = torch.tensor(idx, device=dev)
            U[:, ix, :c], S[ix, :c], V[:, ix, :c] = u.permute(1, 0, 2), sv, vh.permute(2, 0, 1)
            del mods, B, A, u, vh
    # The directions each adapter brings; a pair compares the smaller of its two (its own ranks, not the
    # collection's smallest: adding an adapter never changes another pair's φ).
    ks = torch.tensor([min(r, m, n, st.top_k or r) for r in task.ranks])
    rc = min(m, n, int(sum(min(r, m, n) for r in task.ranks)),
             st.curve_rank or 4 * task.shared_rank)
    R = min(task.shared_rank, rc)
    # Every draw seeded by its item's name (Compute.seed_for): the same numbers whatever the order of the
    # modules or the worker that runs this one.
    left = _side(U, S, ks, rc, st, cp.seed_for(f"{task.name}:shared-left"))
    right = _side(V, S, ks, rc, st, cp.seed_for(f"{task.name}:shared-right"))
    total = (S.double() ** 2).sum(-1)  # (p,) ‖ΔW_i‖²
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # ‖U_Rᵀ ΔW_i V_R‖² for every R at once: M_i = (U_Rᵀ U_i) S_i (V_iᵀ V_R) (rc, rc),
    # then the 2-D prefix sums of M_i².
    M = (left.coef * S[:, None, :]) @ right.coef.transpose(-1, -2)  # (p, rc, rc)
    both = torch.diagonal((M.double() ** 2).cumsum(-1).cumsum(-2), dim1=-2, dim2=-1)  # (p, rc)
    met = spectrum_metrics(S.cpu())
    # The baseline belongs to (d, k), not to the module: one draw per shape and k, seeded by its own name,
    # cached; kept as a small table per side (each pair reads the entry of its own k, :meth:`random_on`).
    pair_ks = torch.minimum(ks[:, None], ks[None, :]).unique().tolist()
    rnd = {side: {kk: _random_phi(d, kk, st.draws, cp.seed_for(f"random-phi:{d}x{kk}")) for kk in pair_ks}
           for side, d in (("out", m), ("in", n))}
    return ModuleResult(
        name=task.name, module_type=task.module_type, shape=task.shape, members=task.members,
        ks=tuple(ks.tolist()), shared_rank=R, phi_out=left.phi.cpu(), phi_in=right.phi.cpu(), norms=total.sqrt().cpu(),
        effective_rank=met["effective_rank"], random=rnd, sv_left=left.sv.cpu(), sv_right=right.sv.cpu(),
        energy_left=(left.energy / safe[:, None]).cpu(), energy_right=(right.energy / safe[:, None]).cpu(),
        energy_both=(both / safe[:, None]).cpu(),
        basis_left=left.basis[:, :R].float().cpu() if st.keep_basis else None,
        basis_right=right.basis[:, :R].float().cpu() if st.keep_basis else None,
        module_path=task.names[0], layout=task.layout,
    )


@dataclass
class _SideStats:
    phi: torch.Tensor  # (p, p) float64
    sv: torch.Tensor  # (rc,) float64
    basis: torch.Tensor  # (d, rc) orthonormal
    coef: torch.Tensor  # (p, rc, r): basisᵀ U_i
    energy: torch.Tensor  # (p, rc) float64, unnormalized: Σ_{j≤R} ‖basis_jᵀ U_i S_i‖²


def _side(U: torch.Tensor, S: torch.Tensor, ks: torch.Tensor, rc: int, st: CollectionSettings,
          seed: int) -> _SideStats:
    """φ and the shared basis of one side; ``U (d, p, r)``: adapter i's orthonormal columns ``U[:, i]``
    (zero-padded), ``S (p, r)``, ``ks (p,)`` the directions each adapter brings to φ."""
    d, p, r = U.shape
    X = U.reshape(d, p * r)  # (d, p·r), adapter-major columns: a view
    Fs = S.reshape(p * r)  # (p·r,) column scales of F = X diag(Fs)
    itemsize = torch.finfo(U.dtype).bits // 8
    if p * r <= d:
        G = _gram(X)  # (p·r, p·r): one (half) GEMM
        phi_ = _pair_phi(G.reshape(p, r, p, r), ks)
        FtF = Fs[:, None] * G * Fs[None, :]  # (p·r, p·r) = D G D
        W, lam = top_left_subspace(FtF, rc, n_iter=st.n_iter, seed=seed)  # eigenpairs of a PSD matrix
        sv = lam.clamp_min(0).sqrt()
        # σ² below eps·σ_1² is round-off of the Gram: those columns carry no energy and are dropped (the QR
        # below completes the basis with directions orthogonal to the kept ones).
        keep = sv > sv[:1] * 10 * torch.finfo(sv.dtype).eps ** 0.5
        basis = X @ (Fs[:, None] * W / torch.where(keep, sv, torch.ones_like(sv)))  # (d, rc) = F W Σ⁻¹
        basis = basis * keep
    else:
        # Rows grouped by their adapter's k: pair (i, j) with k_i ≤ k_j compares k_i directions, so group k's
        # rows meet only the adapters with k_j ≥ k, through their first k columns; the pairs with k_j < k
        # are filled from group k_j's pass (φ is symmetric). Mixed ranks: no work at the largest k.
        phi_ = torch.empty(p, p, dtype=torch.float64, device=U.device)
        for k in ks.unique().tolist():
            idx = (ks == k).nonzero()[:, 0].to(U.device)
            cols = (ks >= k).nonzero()[:, 0].to(U.device)
            Xk = (U[:, :, :k] if len(cols) == p else U[:, cols, :k]).reshape(d, len(cols) * k)  # (d, c·k)
            rows = max(1, (st.compute.max_memory or 1 << 62) // max(1, k * len(cols) * k * itemsize))  # per block
            one_rank = len(idx) == p  # every adapter at this k: rows are slices of Xk, no gathers
            for lo in range(0, len(idx), rows):
                if one_rank:
                    phi_[lo: lo + rows] = _block_phi((Xk[:, lo * k: (lo + rows) * k].T @ Xk).reshape(-1, k, p, k), k)
                    continue
                ii = idx[lo: lo + rows]
                Xr = U[:, ii, :k].reshape(d, len(ii) * k)  # (d, rows·k)
                blk = _block_phi((Xr.T @ Xk).reshape(len(ii), k, len(cols), k), k)  # (rows, c)
                phi_[ii[:, None], cols[None, :]] = blk
                phi_[cols[:, None], ii[None, :]] = blk.T
        F = X * Fs
        basis, sv = top_left_subspace(_gram(F.T), rc, n_iter=st.n_iter, seed=seed)  # F Fᵀ: (d, rc), σ²
        sv = sv.clamp_min(0).sqrt()
    # Orthonormalize (QR keeps every prefix span) so energies stay ≤ 1 when tiny σ lost digits to the Gram.
    Q, Rr = torch.linalg.qr(basis)
    basis = (Q * torch.where(torch.diagonal(Rr) < 0, -1.0, 1.0).to(Q.dtype)).to(U.dtype)
    coef = (basis.T @ X).reshape(rc, p, r).transpose(0, 1)  # (p, rc, r)
    energy = ((coef * S[:, None, :]).double() ** 2).sum(-1).cumsum(-1)  # (p, rc)
    return _SideStats(phi_, sv.double(), basis, coef, energy)


#: Adapters per factored SVD while the bases are collected: bounds the transient upcast factors and QRs.
SVD_GROUP = 16

#: Column blocks of :func:`_gram` (at least this wide, so each GEMM still runs near peak).
_GRAM_BLOCK = 128


def _gram(X: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """``Xᵀ X (c, c)`` of ``X (d, c)`` from its upper block triangle, mirrored.

    Row block ``b`` times the columns from ``b`` on: ``(blocks + 1) / (2·blocks)``
    of the flops of ``X.T @ X`` (56 % at 8 blocks) in a few large GEMMs; the
    blocks below the diagonal are copies of those above. Below ``2·_GRAM_BLOCK`` columns: one GEMM.
    """
    c = X.shape[1]
    if c < 2 * _GRAM_BLOCK:
        return X.T @ X
    width = max(_GRAM_BLOCK, -(-c // blocks))
    G = torch.empty(c, c, dtype=X.dtype, device=X.device)
    for lo in range(0, c, width):
        hi = min(c, lo + width)
        G[lo:hi, lo:] = X[:, lo:hi].T @ X[:, lo:]
        G[hi:, lo:hi] = G[lo:hi, hi:].T
    return G


def _block_phi(G4: torch.Tensor, k: int) -> torch.Tensor:
    """``(b, r, c, r)`` Gram blocks → φ ``(b, c)`` over each block's top-left ``(k, k)`` corner.

    Squares in the compute dtype (one rounding each: relative error ≤ u), summed in float64 (the k²
    terms add no error of their size): φ within u·φ of the squares of the computed Gram, without a
    float64 copy of the whole Gram.
    """
    return (G4[:, :k, :, :k] ** 2).sum(dim=(1, 3), dtype=torch.float64) / k


def _pair_phi(G4: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """The whole Gram's blocks ``(p, r, p, r)`` → φ ``(p, p)``, pair ``(i, j)`` over its own
    ``κ = min(k_i, k_j)`` (:func:`_block_phi` of the rows of one k against the columns that reach it; the
    pairs below the diagonal of k from the transposed pass). One pass when every adapter has one rank."""
    p = G4.shape[0]
    out = torch.empty(p, p, dtype=torch.float64, device=G4.device)
    for k in ks.unique().tolist():
        rows = (ks == k).nonzero()[:, 0].to(G4.device)
        cols = (ks >= k).nonzero()[:, 0].to(G4.device)
        blk = G4[:, :k, :, :k]
        blk = blk if len(rows) == p else blk.index_select(0, rows)
        blk = _block_phi(blk if len(cols) == p else blk.index_select(2, cols), k)  # (rows, cols)
        out[rows[:, None], cols[None, :]] = blk
        out[cols[:, None], rows[None, :]] = blk.T
    return out


@functools.lru_cache(maxsize=256)
def _random_phi(d: int, k: int, draws: int, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of φ between independent Haar-random ``k``-dim subspaces of ``R^d``."""
    _, Ua, Ub = sampled_phi_grid(d, k, k, draws, seed, dtype=torch.float64)
    x = phi(Ua, Ub)  # (draws,)
    return float(x.mean()), float(x.std()) if draws > 1 else 0.0


def _read(path: str, name: str):
    return index_once(path).read(name)
