"""Collections: N adapters of one base compared at once, one module at a time.

For every module present in at least two adapters, and for each of its ``N``
(those that have it) updates ``ΔW_i = s_i B_i A_i = U_i diag(S_i) V_iᵀ``
(factored SVD, :func:`~lora_lens.linalg.factored_svd`; ΔW never formed):

- **similarity** ``φ_ij = ½ (‖U_iᵏᵀ U_jᵏ‖_F² + ‖V_iᵏᵀ V_jᵏ‖_F²) / k`` — LoRA
  §7's φ over the top-``k`` output (left) and input (right) directions,
  averaged (``k`` = the module's smallest rank unless ``top_k`` says less).
  Random baseline: ``½ (k/m + k/n)`` expected, and the mean and spread of φ
  between Haar-random ``k``-dim subspaces (:mod:`.baselines`).
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
  Gram ``G = Xᵀ X (N·r, N·r)``: the same ``d·(N·r)²`` flops in a single
  large GEMM near peak; φ is the sum of squares of each ``(k, k)`` block of
  ``G``'s top-left corners. The shared basis reuses ``G``: ``Fᵀ F = D G D``
  (``D = diag(S)``), whose top eigenvectors ``W`` give ``U_R = F W / σ``.
  When ``N·r > d`` the smaller ``F Fᵀ (d, d)`` is used instead and ``G`` is
  formed in row blocks. Memory: the stacked factors plus ``min(N·r, d)²``
  (at most one base weight's size), whatever ``N``.

The unit of work is one module across all files (:func:`module_task`): a
plain function of a picklable :class:`ModuleTask` that reads the files itself
(header + two tensors per file, :mod:`lora_lens.io.lazy`) and returns a small
:class:`ModuleResult`, so it runs in-process or on Dask workers
(:mod:`lora_lens.dist`) with the same numbers. :func:`collection_similarity`
plans the tasks, maps them and aggregates.
"""

from __future__ import annotations

import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..compute import DEFAULT_MAX_MEMORY, Progress, resolve_device, resolve_dtype
from ..errors import ConfigError, KeyMatchError, ShapeError
from ..io.lazy import AdapterIndex, cached_index, index_adapter
from ..jsonable import JsonFields, stamp
from ..keys import normalize_module_path, parse_module_path
from ..linalg import factored_svd, phi, top_left_subspace
from ..spectra import spectrum_metrics
from .baselines import DRAWS, sampled_phi_grid
from .serialize import as_list, num

#: ``mapper(fn, tasks)`` → results in task order (builtin ``map``, or Dask's, :mod:`lora_lens.dist`).
Mapper = Callable[[Callable, Sequence], Iterable]


@dataclass(frozen=True)
class CollectionSettings(JsonFields):
    """Run-wide options of a collection, resolved once and shipped with every task.

    ``top_k``: directions compared (None: each module's smallest rank).
    ``shared_rank``: ``R`` of the reported shared basis (None: the largest
    rank). ``curve_rank``: the energy curves go to ``R = curve_rank`` (None:
    ``4·shared_rank``), clipped at ``min(m, n, Σ r)``. ``keep_basis``: return
    the bases (for ``--write-basis``). ``device``/``dtype`` are resolved on the
    worker (``auto`` picks its GPU).
    """

    top_k: int | None = None
    weighted: bool = False
    shared_rank: int | None = None
    curve_rank: int | None = None
    keep_basis: bool = False
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    draws: int = DRAWS
    max_memory: int | None = DEFAULT_MAX_MEMORY
    #: Power iterations of CoRA's kernel on the Gram of the stacked factors (each counts twice on the
    #: factors themselves, since the Gram squares the spectrum): 4 here ≈ CoRA's 8 on the matrix.
    n_iter: int = 4


@dataclass(frozen=True)
class ModuleTask:
    """One module across the adapters that have it: what a worker needs to compute it (picklable)."""

    name: str
    module_type: str
    shape: tuple[int, int]
    members: tuple[int, ...]
    paths: tuple[str, ...]
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    shared_rank: int
    settings: CollectionSettings
    layout: str = "linear"


@dataclass(frozen=True, eq=False)
class ModuleResult:
    """One module's small result (float64, on the CPU); rows in ``members`` order.

    ``phi_left``/``phi_right`` ``(p, p)``; ``norms``, ``effective_rank`` ``(p,)``;
    ``random`` baseline numbers per side; ``sv_left``/``sv_right`` ``(R_c,)``
    the stacked factors' singular values; ``energy_left``/``_right``/``_both``
    ``(p, R_c)`` the captured fraction of each ‖ΔW_i‖² for ``R = 1..R_c``;
    ``basis_left (m, R)``/``basis_right (n, R)`` only with ``keep_basis``.
    """

    name: str
    module_type: str
    shape: tuple[int, int]
    members: tuple[int, ...]
    k: int
    shared_rank: int
    phi_left: torch.Tensor
    phi_right: torch.Tensor
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
    def phi(self) -> torch.Tensor:
        """``(p, p)``: left and right φ averaged."""
        return 0.5 * (self.phi_left + self.phi_right)


# ---------------------------------------------------------------- per-module kernel (runs on a worker)

def module_task(task: ModuleTask) -> ModuleResult:
    """Compute one module across its adapters (see the module docstring); reads the files itself."""
    st = task.settings
    dev, dt = resolve_device(st.device), resolve_dtype(st.dtype)
    m, n = task.shape
    p, rmax = len(task.paths), max(task.ranks)
    U = torch.zeros(p, m, rmax, device=dev, dtype=dt)  # zero columns past each rank add nothing to any product
    V = torch.zeros(p, n, rmax, device=dev, dtype=dt)
    S = torch.zeros(p, rmax, device=dev, dtype=dt)
    by_rank: OrderedDict[int, list[int]] = OrderedDict()
    for i, r in enumerate(task.ranks):
        by_rank.setdefault(r, []).append(i)
    for r, idx in by_rank.items():
        mods = [_read(task.paths[i], task.names[i]) for i in idx]
        B = torch.stack([x.B for x in mods]).to(dev)  # (g, m, r)
        A = torch.stack([x.A for x in mods]).to(dev)  # (g, r, n)
        s = torch.tensor([x.scaling for x in mods], dtype=dt, device=dev)
        u, sv, vh = factored_svd(B, A, s, dtype=dt)  # (g, m, c), (g, c), (g, c, n), c = min(r, m, n)
        c = sv.shape[-1]
        ix = torch.tensor(idx, device=dev)
        U[ix, :, :c], S[ix, :c], V[ix, :, :c] = u, sv, vh.transpose(-1, -2)
        del mods, B, A
    k = min(min(task.ranks), m, n) if st.top_k is None else min(st.top_k, min(task.ranks), m, n)
    rc = min(m, n, int(sum(min(r, m, n) for r in task.ranks)),
             st.curve_rank or 4 * task.shared_rank)
    R = min(task.shared_rank, rc)
    left, right = _side(U, S, k, rc, st), _side(V, S, k, rc, st)
    total = (S.double() ** 2).sum(-1)  # (p,) ‖ΔW_i‖²
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # ‖U_Rᵀ ΔW_i V_R‖² for every R at once: M_i = (U_Rᵀ U_i) S_i (V_iᵀ V_R) (rc, rc),
    # then the 2-D prefix sums of M_i².
    M = (left.coef * S[:, None, :]) @ right.coef.transpose(-1, -2)  # (p, rc, rc)
    both = torch.diagonal((M.double() ** 2).cumsum(-1).cumsum(-2), dim1=-2, dim2=-1)  # (p, rc)
    met = spectrum_metrics(S.cpu())
    rnd = {}
    for side, d in (("left", m), ("right", n)):
        mean, std = _random_phi(d, k, st.draws, st.seed)
        rnd.update({f"{side}_mean": mean, f"{side}_std": std, f"{side}_expected": k / d})
    return ModuleResult(
        name=task.name, module_type=task.module_type, shape=task.shape, members=task.members, k=k, shared_rank=R,
        phi_left=left.phi.cpu(), phi_right=right.phi.cpu(), norms=total.sqrt().cpu(),
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


def _side(U: torch.Tensor, S: torch.Tensor, k: int, rc: int, st: CollectionSettings) -> _SideStats:
    """φ and the shared basis of one side; ``U (p, d, r)`` orthonormal columns (zero-padded), ``S (p, r)``."""
    p, d, r = U.shape
    X = U.transpose(0, 1).reshape(d, p * r)  # (d, p·r), adapter-major columns
    Fs = S.reshape(p * r)  # (p·r,) column scales of F = X diag(Fs)
    itemsize = torch.finfo(U.dtype).bits // 8
    if p * r <= d:
        G = X.T @ X  # (p·r, p·r): the one GEMM
        phi_ = _block_phi(G.reshape(p, r, p, r), k)
        FtF = Fs[:, None] * G * Fs[None, :]  # (p·r, p·r) = D G D
        W, lam = top_left_subspace(FtF, rc, n_iter=st.n_iter, seed=st.seed)  # eigenpairs of a PSD matrix
        sv = lam.clamp_min(0).sqrt()
        # σ² below eps·σ_1² is round-off of the Gram: those columns carry no energy and are dropped (the QR
        # below completes the basis with directions orthogonal to the kept ones).
        keep = sv > sv[:1] * 10 * torch.finfo(sv.dtype).eps ** 0.5
        basis = (X * Fs) @ (W / torch.where(keep, sv, torch.ones_like(sv)))  # (d, rc)
        basis = basis * keep
    else:
        Xk = U[:, :, :k].transpose(0, 1).reshape(d, p * k)  # (d, p·k)
        rows = max(1, (st.max_memory or 1 << 62) // max(1, k * p * k * itemsize))  # adapters per row block
        phi_ = torch.cat([_block_phi((Xk[:, lo * k: (lo + rows) * k].T @ Xk).reshape(-1, k, p, k), k)
                          for lo in range(0, p, rows)])
        F = X * Fs
        basis, sv = top_left_subspace(F @ F.T, rc, n_iter=st.n_iter, seed=st.seed)  # (d, rc), σ²
        sv = sv.clamp_min(0).sqrt()
    # Orthonormalize (QR keeps every prefix span) so energies stay ≤ 1 when tiny σ lost digits to the Gram.
    Q, Rr = torch.linalg.qr(basis)
    basis = (Q * torch.where(torch.diagonal(Rr) < 0, -1.0, 1.0).to(Q.dtype)).to(U.dtype)
    coef = (basis.T @ X).reshape(rc, p, r).transpose(0, 1)  # (p, rc, r)
    energy = ((coef * S[:, None, :]).double() ** 2).sum(-1).cumsum(-1)  # (p, rc)
    return _SideStats(phi_, sv.double(), basis, coef, energy)


def _block_phi(G4: torch.Tensor, k: int) -> torch.Tensor:
    """``(b, r, p, r)`` Gram blocks → φ ``(b, p)`` over each block's top-left ``(k, k)`` corner."""
    return (G4[:, :k, :, :k].double() ** 2).sum(dim=(1, 3)) / k


@functools.lru_cache(maxsize=256)
def _random_phi(d: int, k: int, draws: int, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of φ between independent Haar-random ``k``-dim subspaces of ``R^d``."""
    _, Ua, Ub = sampled_phi_grid(d, k, k, draws, seed, dtype=torch.float64)
    x = phi(Ua, Ub)  # (draws,)
    return float(x.mean()), float(x.std()) if draws > 1 else 0.0


def _read(path: str, name: str):
    return cached_index(path, os.stat(path).st_mtime_ns).read(name)


# ---------------------------------------------------------------- planning and aggregation (client)

@dataclass(frozen=True, eq=False)
class CollectionSimilarity:
    """:func:`collection_similarity`'s result; matrices ``(N, N)`` float64 in input order.

    ``phi``: aggregated over all compared modules (mean, or ``‖ΔW‖``-weighted);
    ``by_type[t]``: the same over one module type; ``random_phi`` /
    ``random_std``: the same aggregate of the random baseline (mean and spread);
    ``common[i, j]``: how many modules adapters ``i`` and ``j`` share.
    ``norms (N,)``: ``sqrt(Σ ‖ΔW‖²)`` over the adapter's compared modules;
    ``effective_rank (N,)``: its mean over them.
    """

    labels: tuple[str, ...]
    paths: tuple[str, ...]
    modules: tuple[ModuleResult, ...]
    phi: torch.Tensor
    by_type: "OrderedDict[str, torch.Tensor]"
    random_phi: torch.Tensor
    random_std: torch.Tensor
    common: torch.Tensor
    norms: torch.Tensor
    effective_rank: torch.Tensor
    partial: dict
    skipped: dict
    settings: CollectionSettings
    notes: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.labels)

    def shared_energy(self, side: str = "both") -> tuple[torch.Tensor, torch.Tensor]:
        """Per adapter, the fraction of its total ``Σ ‖ΔW‖²`` the shared bases capture.

        Returns ``(at_R (N,), curve (N, R_max))``: at each module's shared rank,
        and for ``R = 1..R_max`` (a module whose curve ends earlier keeps its last value).
        """
        N = self.size
        rmax = max(m.energy_both.shape[1] for m in self.modules)
        num_, den = torch.zeros(N, rmax, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
        at = torch.zeros(N, dtype=torch.float64)
        for m in self.modules:
            e = getattr(m, f"energy_{side}")  # (p, rc)
            w = m.norms ** 2
            ix = torch.tensor(m.members)
            padded = torch.cat([e, e[:, -1:].expand(-1, rmax - e.shape[1])], dim=1)
            num_[ix] += w[:, None] * padded
            at[ix] += w * e[:, m.shared_rank - 1]
            den[ix] += w
        safe = torch.where(den > 0, den, torch.ones_like(den))
        return at / safe, num_ / safe[:, None]

    def to_dict(self) -> dict:
        # reshaped: matrices as lists, per-module and shared-basis summaries (tensors go to .safetensors)
        at, curve = self.shared_energy("both")
        at_l, curve_l = self.shared_energy("left")
        types = list(self.by_type)
        return stamp("collection", {
            "settings": self.settings.to_dict(),
            "adapters": [{"label": lab, "path": p, "norm": num(self.norms[i]),
                          "effective_rank": num(self.effective_rank[i])}
                         for i, (lab, p) in enumerate(zip(self.labels, self.paths))],
            "conventions": CONVENTIONS,
            "phi": as_list(self.phi), "random_phi": as_list(self.random_phi), "random_std": as_list(self.random_std),
            "common_modules": self.common.int().tolist(),
            "by_module_type": {t: as_list(self.by_type[t]) for t in types},
            "modules": [{"name": m.name, "module_type": m.module_type, "shape": list(m.shape),
                         "members": list(m.members), "k": m.k, "mean_phi": num(_offdiag_mean(m.phi)),
                         "random_phi": num(0.5 * (m.random["left_mean"] + m.random["right_mean"])),
                         "shared_rank": m.shared_rank,
                         "shared_energy": as_list(m.energy_both[:, m.shared_rank - 1])}
                        for m in self.modules],
            "partial_modules": self.partial, "skipped_modules": self.skipped,
            "shared_basis": {"energy_both_at_rank": as_list(at), "energy_left_at_rank": as_list(at_l),
                             "curve_both": as_list(curve), "curve_left": as_list(curve_l)},
            "notes": list(self.notes),
        })


CONVENTIONS = {
    "phi": "½(‖U_iᵀU_j‖_F² + ‖V_iᵀV_j‖_F²)/k over the top-k left (output) and right (input) singular "
           "vectors of each ΔW = s·B·A, averaged over the modules both adapters have (weighted by "
           "sqrt(‖ΔW_i‖·‖ΔW_j‖) when settings.weighted); 1 = same subspaces",
    "random_phi": "the same aggregate for Haar-random k-dim subspaces (sampled mean; random_std its spread)",
    "shared_basis": "per module, top-R left (U_R) and right (V_R) singular vectors of the stacked "
                    "factors [U_1 S_1 | … | U_N S_N] (CoRA's common subspace); "
                    "energy_both = ‖U_Rᵀ ΔW V_R‖²/‖ΔW‖², energy_left = ‖U_Rᵀ ΔW‖²/‖ΔW‖², summed over "
                    "modules weighted by ‖ΔW‖²; curves for R = 1..",
    "norm": "sqrt(Σ over compared modules of ‖ΔW‖_F²)",
    "effective_rank": "Roy & Vetterli effective rank of ΔW, mean over compared modules",
}


def _offdiag_mean(x: torch.Tensor) -> float:
    p = x.shape[0]
    if p < 2:
        return math.nan
    return float((x.sum() - x.diagonal().sum()) / (p * (p - 1)))


def plan_collection(
    paths: Sequence[str | Path], settings: CollectionSettings = CollectionSettings(), *, allow_partial: bool = False
) -> tuple[list[ModuleTask], tuple[str, ...], dict, dict]:
    """Read every file's header, match modules across adapters, and make one task per module.

    Returns ``(tasks, labels, partial, skipped)``: ``partial[name]`` lists the
    adapters a compared module is missing from; ``skipped[name]`` says why a
    module was left out or narrowed (in one adapter only; under ``allow_partial``
    a module whose shapes differ is compared over the adapters of its most common shape).
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError(f"a collection needs at least two adapters; got {len(paths)}. "
                          "Use `lora-lens spectrum`/`similarity` for one adapter.")
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ConfigError(f"{p}: is listed twice (also as {seen[real]}); expected each adapter once. "
                              "Remove the duplicate line.")
        seen[real] = p
    indexes = [index_adapter(p) for p in paths]
    labels = _labels(indexes)
    # key (backbone prefixes stripped) → [(adapter i, name in that file, ref)]
    found: OrderedDict[str, list] = OrderedDict()
    for i, ix in enumerate(indexes):
        for name, ref in ix.refs.items():
            found.setdefault(normalize_module_path(name), []).append((i, name, ref))
    found = OrderedDict(sorted(found.items(), key=lambda kv: parse_module_path(kv[0]).sort_key()))
    partial, skipped, tasks = {}, {}, []
    for key, members in found.items():
        shapes = OrderedDict()
        for i, name, ref in members:
            shapes.setdefault(ref.shape, []).append(i)
        if len(shapes) > 1:
            (s0, a0), (s1, a1) = list(shapes.items())[:2]
            msg = (f"module '{key}' is {s0[0]}×{s0[1]} in {paths[a0[0]]} but {s1[0]}×{s1[1]} in {paths[a1[0]]}")
            if not allow_partial:
                raise ShapeError(f"{msg}; expected adapters of one base. Pass --allow-partial to compare only the "
                                 "modules whose shapes agree.")
            keep = max(shapes, key=lambda sh: len(shapes[sh]))  # the most common shape (first on ties)
            skipped[key] = f"shapes differ ({msg}); compared over the {len(shapes[keep])} adapters of shape {keep}"
            members = [x for x in members if x[2].shape == keep]
        if len(members) < 2:
            skipped[key] = (skipped.get(key, "") + "; " if key in skipped else "") + f"only in {labels[members[0][0]]}"
            continue
        if len(members) < len(paths):
            have = {i for i, _, _ in members}
            partial[key] = [labels[i] for i in range(len(paths)) if i not in have]
        ref0 = members[0][2]
        ranks = tuple(ref.rank for _, _, ref in members)
        tasks.append(ModuleTask(
            name=key, module_type=ref0.key.module, shape=ref0.shape, members=tuple(i for i, _, _ in members),
            paths=tuple(os.path.abspath(paths[i]) for i, _, _ in members),  # a worker may run in another folder
            names=tuple(name for _, name, _ in members), ranks=ranks,
            shared_rank=settings.shared_rank or max(ranks), settings=settings, layout=ref0.layout,
        ))
    if not tasks:
        raise KeyMatchError(f"no LoRA module is shared by two of the {len(paths)} adapters "
                            f"(e.g. {list(found)[:2]}); expected adapters trained on the same modules of one base.")
    lonely = [labels[i] for i in range(len(paths)) if not any(i in t.members for t in tasks)]
    if lonely and not allow_partial:
        raise KeyMatchError(f"{lonely[0]} shares no LoRA module with the other adapters; expected adapters of one "
                            "base. Pass --allow-partial to compare the others anyway.")
    return tasks, labels, partial, skipped


def _labels(indexes: Sequence[AdapterIndex]) -> tuple[str, ...]:
    """Folder names; a name used twice gets its parent folder (then its position) to tell them apart."""
    labels = [ix.label for ix in indexes]
    for i, ix in enumerate(indexes):
        if labels.count(ix.label) > 1:
            labels[i] = f"{Path(ix.path).parent.name}/{ix.label}"
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    return tuple(labels)


def collection_similarity(
    paths: Sequence[str | Path],
    settings: CollectionSettings = CollectionSettings(),
    *,
    allow_partial: bool = False,
    mapper: Mapper | None = None,
    progress: Progress | None = None,
) -> CollectionSimilarity:
    """φ between every pair of ``paths``, per module and aggregated; shared-basis statistics.

    ``mapper`` runs :func:`module_task` over the tasks (builtin ``map`` by
    default, one module at a time; :func:`lora_lens.dist.dask_mapper` for a
    Dask cluster). Only the small per-module results come back here.
    """
    if settings.top_k is not None and settings.top_k < 1:
        raise ConfigError(f"top_k={settings.top_k}; expected a positive number of directions.")
    if settings.shared_rank is not None and settings.shared_rank < 1:
        raise ConfigError(f"shared_rank={settings.shared_rank}; expected a positive rank.")
    tasks, labels, partial, skipped = plan_collection(paths, settings, allow_partial=allow_partial)
    results = []
    for res in (mapper or map)(module_task, tasks):
        results.append(res)
        if progress:
            progress(len(results), len(tasks), res.name)
    return aggregate(results, labels, tuple(str(p) for p in paths), settings, partial, skipped)


def aggregate(results: Sequence[ModuleResult], labels, paths, settings: CollectionSettings, partial: dict,
              skipped: dict) -> CollectionSimilarity:
    """Per-module results → ``(N, N)`` aggregates (see :class:`CollectionSimilarity`)."""
    N = len(labels)
    z = functools.partial(torch.zeros, N, N, dtype=torch.float64)
    acc = {"all": [z(), z(), z(), z()]}  # Σ w φ, Σ w, Σ w μ_rand, Σ w² σ²_rand
    common = z()
    sq, er, cnt = (torch.zeros(N, dtype=torch.float64) for _ in range(3))
    for m in results:
        ix = torch.tensor(m.members)
        grid = torch.meshgrid(ix, ix, indexing="ij")
        w = (m.norms[:, None] * m.norms[None, :]).sqrt() if settings.weighted else torch.ones(len(ix), len(ix),
                                                                                                dtype=torch.float64)
        mu = 0.5 * (m.random["left_mean"] + m.random["right_mean"])
        var = 0.25 * (m.random["left_std"] ** 2 + m.random["right_std"] ** 2)
        for tag in ("all", m.module_type):
            a = acc.setdefault(tag, [z(), z(), z(), z()])
            a[0][grid] += w * m.phi
            a[1][grid] += w
            a[2][grid] += w * mu
            a[3][grid] += w ** 2 * var
        common[grid] += 1
        sq[ix] += m.norms ** 2
        er[ix] += m.effective_rank
        cnt[ix] += 1

    def ratio(a, b):
        return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.full_like(a, math.nan))

    S, W, MU, VAR = acc.pop("all")
    by_type = OrderedDict((t, ratio(a[0], a[1])) for t, a in acc.items())
    notes = []
    if bool((common == 0).any()):
        notes.append("some pairs of adapters share no module: their φ is NaN (treated as distance 1 for clustering).")
    return CollectionSimilarity(
        labels=tuple(labels), paths=tuple(paths), modules=tuple(results), phi=ratio(S, W), by_type=by_type,
        random_phi=ratio(MU, W), random_std=ratio(VAR.sqrt(), W), common=common, norms=sq.sqrt(),
        effective_rank=ratio(er, cnt), partial=partial, skipped=skipped, settings=settings, notes=tuple(notes),
    )
