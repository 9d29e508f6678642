"""Which subspace of each module is compared, and the batched φ kernel over many of them.

A subspace is an orthonormal basis ``(d, k)`` whose columns are ordered by
importance (singular vectors, descending σ). Which singular vectors
(docs/maths.md §2, LoRA §7):

=========  =============================================  ===========  ===================
what       matrix                                         side         d
=========  =============================================  ===========  ===================
delta      ``ΔW = s·B A`` (factored, never formed)         out (U)      m (output space)
B          ``B (m, r)``                                   out (U)      m
A          ``A (r, n)``                                   in (V)       n (input space)
base       ``W0 (m, n)``, top-k (see below)                out (U)      m
=========  =============================================  ===========  ===================

Base subspaces must be the exact top-k (a range finder with a fixed number of
iterations gave φ 0.77–0.84 against the exact subspace on a flat spectrum): they
come from :func:`~lora_lens.linalg.top_subspace_svd`, a full SVD for small
matrices, else iterations until the estimated ``1 − φ`` to the exact subspace is
below ``SUBSPACE_TOL``; each :class:`Subspace` records the method and that estimate.

``side="in"`` picks the input space (right singular vectors V) of ``delta`` or
``base`` instead, and ``side="both"`` compares both and averages φ (docs/maths.md §2,
"one φ per pair"). The default is ``out`` (:data:`SIDE_WHY`). ``left``/``right``
are accepted as the old names of ``out``/``in``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from ..compute import Compute, as_compute
from ..decompose import decompose_adapter, decompose_base, decompose_matrices
from ..errors import ConfigError
from ..io.base import BaseWeights
from ..io.layout import with_base_layouts
from ..precision import full_fp32
from ..types import Adapter, LayerKey
from .pairing import pair_with_base

WHATS = ("delta", "A", "B", "base")
#: Which singular vectors φ compares: ``out`` = left (U, output space), ``in`` = right (V, input space),
#: ``both`` = φ of each, averaged.
SIDES = ("out", "in", "both")
#: The old names, still accepted by the API.
SIDE_ALIASES = {"left": "out", "right": "in"}
#: Default side per object: output-space objects use U, input-space objects V. ``delta`` (what similarity,
#: collection and report compare) defaults to ``out`` everywhere, for the reason in :data:`SIDE_WHY`.
DEFAULT_SIDE = {"delta": "out", "B": "out", "A": "in", "base": "out"}
#: Why ``out`` is the default, as the outputs say it.
SIDE_WHY = ("after short training the input side mostly reflects A's random init, so adapters that share an init "
            "seed look alike there whatever their task")


def side_note(what: str, side: str) -> str:
    """One line for the outputs: which singular vectors a resolved ``side`` compares, and why ``out`` is the default."""
    obj = {"delta": "ΔW", "A": "A", "B": "B", "base": "W0"}[what]
    if what in ("A", "B"):
        return f"side {side}: {obj}'s only comparable side ({'input' if what == 'A' else 'output'} space)."
    space = {"out": f"{obj}'s output space (left singular vectors U)",
             "in": f"{obj}'s input space (right singular vectors V)",
             "both": f"the mean of φ over {obj}'s output (U) and input (V) spaces"}[side]
    if what == "base":
        return f"side {side}: {space}."
    lead = "the default" if side == DEFAULT_SIDE[what] else "not the default (out)"
    return f"side {side}: {space}, {lead}; {SIDE_WHY}."


@dataclass(frozen=True, eq=False)
class Subspace:
    """An orthonormal basis ``(d, k)`` of one module's subspace, columns by descending σ."""

    name: str
    key: LayerKey
    basis: torch.Tensor
    #: The matrix was zero (an untrained ΔW with B = 0): the basis is arbitrary.
    zero: bool = False
    #: ``svd`` (exact: factored or full SVD) or ``iterated`` (base only, converged subspace iteration).
    method: str = "svd"
    #: Estimated ``1 − φ`` of this basis against the exact subspace (0 for an SVD).
    error: float = 0.0

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])


def resolve_side(what: str, side: str | None) -> str:
    """``out``, ``in`` or ``both`` for comparing ``what`` (None: :data:`DEFAULT_SIDE`; ``left``/``right`` accepted)."""
    if what not in WHATS:
        raise ConfigError(f"unknown subspace {what!r}; expected one of {list(WHATS)}.")
    if side is None:
        return DEFAULT_SIDE[what]
    side = SIDE_ALIASES.get(side, side)
    if side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; expected out (output space), in (input space) or both.")
    if what in ("A", "B") and side != DEFAULT_SIDE[what]:
        raise ConfigError(
            f"side={side} of {what} lives in the rank-r space, which is not comparable across modules; "
            f"{what} has only its {DEFAULT_SIDE[what]} side."
        )
    return side


def sides_of(side: str) -> tuple[str, ...]:
    """The single sides a resolved ``side`` is made of: ``("out",)``, ``("in",)`` or ``("out", "in")``."""
    return ("out", "in") if side == "both" else (side,)


def adapter_subspaces(
    adapter: Adapter,
    *,
    what: str = "delta",
    k: int | None = None,
    base: BaseWeights | None = None,
    side: str | None = None,
    compute: Compute | None = None,
    **options,
) -> dict[str, Subspace]:
    """One :class:`Subspace` per module, in the adapter's (layer) order.

    ``k=None`` keeps every direction (``r`` for delta/A/B); for ``base`` it
    defaults to the module's rank. ``k`` larger than what a module has is
    clipped to it, with one ``UserWarning`` per adapter naming it and the ranks
    (``Subspace.k`` is the k used).
    Every SVD is one batched call per shape group (see :mod:`lora_lens.decompose`).
    ``side`` is ``out`` or ``in`` (``both``: :func:`adapter_subspaces_by_side`).
    """
    side = resolve_side(what, side)
    if side == "both":
        raise ConfigError("adapter_subspaces gives one side; use adapter_subspaces_by_side for side='both'.")
    return adapter_subspaces_by_side(adapter, what=what, k=k, base=base, side=side, compute=compute,
                                     **options)[side]


def adapter_subspaces_by_side(
    adapter: Adapter,
    *,
    what: str = "delta",
    k: int | None = None,
    base: BaseWeights | None = None,
    side: str | None = None,
    compute: Compute | None = None,
    **options,
) -> dict[str, dict[str, Subspace]]:
    """``{single side: adapter_subspaces(...)}`` for each of :func:`sides_of` ``(side)``, from one decomposition."""
    side = resolve_side(what, side)
    if k is not None and k < 1:
        raise ConfigError(f"k={k}; expected a positive number of directions (or none for all).")
    modules = list(adapter)
    kw = dict(compute=as_compute(compute, **options))
    if what == "delta":
        spectra = decompose_adapter(modules, **kw)
    elif what in ("A", "B"):
        factors = {m.name: (m.A if what == "A" else m.B) for m in modules}
        spectra = decompose_matrices(factors, keys={m.name: m.key for m in modules}, **kw)
    else:
        if base is None:
            raise ConfigError("what='base' compares the base weights' own subspaces; pass the base (--base DIR).")
        conv = [m.name for m in modules if m.layout == "conv"]
        if conv:
            raise ConfigError(f"what='base' does not handle Conv kernels yet (module '{conv[0]}'); "
                              "use what='delta', 'A' or 'B'.")
        modules = list(with_base_layouts(adapter, base))  # Linear vs Conv1D per module, as PEFT decides
        weights = pair_with_base(modules, base)
        kb = k or max(m.rank for m in modules)
        by_weight = decompose_base(base, [weights[m.name] for m in modules], k=kb, n_iter="auto",
                                   layouts={weights[m.name]: m.layout for m in modules}, **kw)
        spectra = {m.name: by_weight[weights[m.name]] for m in modules}
    out: dict[str, dict[str, Subspace]] = {sd: {} for sd in sides_of(side)}
    clipped = {}
    for m in modules:
        sp = spectra[m.name]
        for sd in out:
            basis = sp.U if sd == "out" else sp.Vh.transpose(-1, -2)  # (d, k)
            kk = (m.rank if what == "base" else basis.shape[1]) if k is None else k
            if kk > basis.shape[1]:
                clipped[m.name] = int(basis.shape[1])
            out[sd][m.name] = Subspace(m.name, m.key, basis[:, :kk].contiguous(), zero=bool(sp.S.max() <= 0),
                                       method=sp.method, error=sp.error or 0.0)
    if clipped:  # one warning per adapter, not per module: the result's k says what was used
        ranks = sorted(set(clipped.values()))
        limit = "min(m, n) of the base weight" if what == "base" else "the module rank"
        warnings.warn(f"{adapter.label}: k={k} exceeds {limit} in {len(clipped)} of its {len(modules)} modules; "
                      f"clipped to it ({', '.join(map(str, ranks))}).", stacklevel=2)
    return out


def subspace_accuracy(subs: "dict[str, Subspace]") -> dict:
    """``{"methods": {method: count}, "max_error": largest estimated 1 − φ}`` for a result's JSON."""
    methods: dict[str, int] = {}
    for s in subs.values():
        methods[s.method] = methods.get(s.method, 0) + 1
    return {"methods": methods, "max_error": max((s.error for s in subs.values()), default=0.0)}


def accuracy_note(subs: "dict[str, Subspace]", label: str) -> tuple[str, ...]:
    """Which method gave the subspaces and the largest estimated ``1 − φ`` to the exact ones (when not all SVD)."""
    iterated = [s for s in subs.values() if s.method != "svd"]
    if not iterated:
        return ()
    worst = max(iterated, key=lambda s: s.error)
    return (f"{label}: {len(iterated)} of {len(subs)} subspaces by converged subspace iteration (the rest by full SVD); "
            f"largest estimated 1 − φ to the exact subspace {worst.error:.1e} ({worst.name}).",)


def zero_note(subs: "dict[str, Subspace] | list[Subspace]", what: str, label: str) -> tuple[str, ...]:
    """A warning when some compared matrices are zero, so their φ means nothing."""
    zero = [s.name for s in (subs.values() if isinstance(subs, dict) else subs) if s.zero]
    if not zero:
        return ()
    return (f"{label}: {what} is zero in {len(zero)} module(s) (e.g. {zero[0]}), as in an untrained adapter "
            "(B = 0); their φ compares arbitrary bases.",)


def padded(bases: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack bases ``(d, k_l)`` into ``(L, d, k_max)``, zero columns past each ``k_l``.

    Zero columns add nothing to ``‖U_aᵀ U_b‖_F²``, so one product covers ranks
    that differ by layer (``rank_pattern``).
    """
    kmax = max(b.shape[-1] for b in bases)
    return torch.stack([torch.nn.functional.pad(b, (0, kmax - b.shape[-1])) for b in bases])


@full_fp32
def cross_phi(P: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """φ between every pair of ``L`` subspaces: ``(..., L, L)``.

    ``P (..., L, d, k)`` padded bases with ``ks[l]`` real columns each;
    ``φ[a, b] = ‖U_aᵀ U_b‖_F² / min(k_a, k_b)``. One Gram matrix
    ``(L·k, L·k)`` whose squared blocks are summed: no loop over pairs.
    """
    *batch, L, d, k = P.shape
    X = P.transpose(-2, -3).reshape(*batch, d, L * k)  # (..., d, L·k), layer-major columns
    G2 = (X.transpose(-1, -2) @ X) ** 2  # (..., L·k, L·k)
    S = G2.reshape(*batch, L, k, L, k).sum(dim=(-3, -1))  # (..., L, L)
    kt = torch.as_tensor(list(ks), dtype=P.dtype, device=P.device)
    return S / torch.minimum(kt[:, None], kt[None, :])
