"""Subspace similarity (LoRA paper §7, docs/maths.md §2): layers × layers and adapter × adapter.

``φ(X, Y, i, j) = ‖U_Xⁱᵀ U_Yʲ‖_F² / min(i, j)`` ∈ [0, 1]: 1 when one top
subspace contains the other, ≈ ``max(i, j)/d`` for unrelated ones. Which
singular vectors ``U`` are is set by ``what`` and ``side`` (see :mod:`.subspaces`):
``out`` (U, the default for ΔW), ``in`` (V), or ``both`` (φ of each, averaged).

- :func:`layer_similarity`: within one adapter, per module type, the ``L × L``
  grid ``φ(layer a, layer b)`` with ``i = k_a``, ``j = k_b``.
- :func:`adapter_similarity`: two adapters (two seeds, tasks or ranks), per
  matching module: φ at ``i = j = min(k_a, k_b)``, the whole ``φ(i, j)`` grid
  for ``i ≤ k_a``, ``j ≤ k_b`` (LoRA §7.2), the principal angles between the
  full subspaces and their Grassmann distance ``‖θ‖₂``.

Every number comes with a random baseline (:mod:`.baselines`) of the same
``k`` and side. One definition of a pair's φ (docs/maths.md §2): the pair's own
ranks (``k = min(k_a, k_b)`` per module), so the collection
(:mod:`.collection_kernel`) gives the same number for the same pair.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..compute import Compute, as_compute
from ..errors import ConfigError, KeyMatchError, ShapeError
from ..io.base import BaseWeights
from ..jsonable import stamp
from ..keys import normalize_module_path
from ..linalg import phi_grid, principal_angles
from ..types import Adapter, LayerKey
from .baselines import DRAWS, PairBaseline, deeper_half, layer_baseline, nan_mean, pair_baseline
from .serialize import as_list, in_layer_order, key_fields, num
from .subspaces import (
    Subspace, accuracy_note, adapter_subspaces_by_side, cross_phi, padded, resolve_side, side_note, sides_of,
    subspace_accuracy, zero_note,
)


@dataclass(frozen=True, eq=False)
class LayerGrid:
    """φ between every pair of layers of one module type (and one ambient dim ``d``).

    ``phi``, ``random_phi`` (sampled Haar baseline), ``expected_phi``
    (``max(k_a, k_b)/d``): ``(L, L)`` float64, rows/columns in layer order.
    """

    module_type: str
    blocks: tuple[int | None, ...]
    names: tuple[str, ...]
    dim: int
    ks: tuple[int, ...]
    phi: torch.Tensor
    random_phi: torch.Tensor
    expected_phi: torch.Tensor
    #: Readable block paths where ``blocks`` are position codes (diffusion UNets), else ``None`` each.
    block_names: tuple[str | None, ...] = ()
    #: ``side='both'``: the input space's dim (``dim`` is the output space's); the grids average both sides.
    dim_in: int | None = None

    def summary(self) -> dict[str, float | None]:
        """Mean off-diagonal φ over all layers and over the deeper half (:data:`.baselines.DEEPER_HALF`)."""
        L = len(self.blocks)
        off = ~torch.eye(L, dtype=torch.bool)
        deep = torch.zeros(L, dtype=torch.bool)
        deep[deeper_half(L)] = True
        deep_off = off & deep[:, None] & deep[None, :]
        out = {}
        for tag, mask in (("", off), ("deep_", deep_off)):
            for what, grid in (("", self.phi), ("random_", self.random_phi), ("expected_", self.expected_phi)):
                out[f"{tag}{what}mean_offdiag"] = num(nan_mean(grid[mask]))
        return out

    def to_dict(self) -> dict:
        # reshaped: ks as "k", the summary added
        return {
            "module_type": self.module_type, "blocks": list(self.blocks), "block_names": list(self.block_names),
            "names": list(self.names),
            "dim": self.dim, "dim_in": self.dim_in, "k": list(self.ks), "phi": as_list(self.phi), "random_phi": as_list(self.random_phi),
            "expected_phi": as_list(self.expected_phi), "summary": self.summary(),
        }


@dataclass(frozen=True, eq=False)
class LayerSimilarity:
    """:func:`layer_similarity`'s result: one :class:`LayerGrid` per module type."""

    adapter: str
    path: str
    what: str
    side: str
    #: The largest k used (a module with fewer directions uses all it has: see each grid's ``ks``).
    k: int
    grids: tuple[LayerGrid, ...]
    draws: int
    seed: int
    notes: tuple[str, ...] = ()
    #: ``{"methods": {method: count}, "max_error": estimated 1 − φ}`` of the compared subspaces.
    accuracy: dict | None = None
    #: The k asked for (None: every direction); larger than ``k`` when it was clipped to the rank.
    k_requested: int | None = None

    def to_dict(self) -> dict:
        # reshaped: draws and seed grouped under "baseline"
        return stamp("layer_similarity", {
            "adapter": self.adapter, "path": self.path, "what": self.what,
            "side": self.side, "side_note": side_note(self.what, self.side), "k": self.k,
            "k_requested": self.k_requested, "baseline": {"draws": self.draws, "seed": self.seed},
            "subspaces": self.accuracy,
            "notes": list(self.notes), "grids": [g.to_dict() for g in self.grids],
        })


def layer_similarity(
    adapter: Adapter,
    *,
    what: str = "delta",
    k: int | None = None,
    base: BaseWeights | None = None,
    side: str | None = None,
    draws: int = DRAWS,
    compute: Compute | None = None,
    **options,
) -> LayerSimilarity:
    """Per module type, the ``L × L`` φ grid across the layers of one adapter.

    ``what``: ``delta`` (ΔW's column space, factored), ``A`` (row space of A),
    ``B`` (column space of B) or ``base`` (``W0``'s top-k left singular
    vectors, needs ``base``). ``k=None``: every direction (``r``; for ``base``
    the module's rank). Ranks may differ by layer: ``φ[a, b]`` uses
    ``i = k_a``, ``j = k_b``. One Gram product per module type. ``side``: ``out``
    (default for delta/B/base), ``in`` (input space; A's only side) or ``both`` (the two grids averaged).
    """
    side = resolve_side(what, side)
    cx = as_compute(compute, **options)
    by_side = adapter_subspaces_by_side(adapter, what=what, k=k, base=base, side=side, compute=cx)
    per_side = [_layer_grids(subs, cx, draws) for subs in by_side.values()]
    grids = per_side[0] if len(per_side) == 1 else _both_grids(*per_side)
    subs = next(iter(by_side.values()))
    return LayerSimilarity(adapter.label, str(adapter.path), what, side, max(s.k for s in subs.values()),
                           tuple(grids), draws, cx.seed,
                           tuple(adapter.flags) + zero_note(subs, what, adapter.label)
                           + accuracy_note(subs, adapter.label), subspace_accuracy(subs), k_requested=k)


def _layer_grids(subs: dict[str, Subspace], cx: Compute, draws: int) -> list[LayerGrid]:
    """One :class:`LayerGrid` per (module type, d) of one side's subspaces."""
    dev, dt, seed = cx.device, cx.dtype, cx.seed
    groups: OrderedDict[tuple[str, int], list[Subspace]] = OrderedDict()
    for s in sorted(subs.values(), key=lambda s: s.key.sort_key()):
        groups.setdefault((s.key.module, s.dim), []).append(s)
    grids = []
    for (module_type, d), members in groups.items():
        ks = [s.k for s in members]
        grid = cross_phi(padded([s.basis for s in members]).to(dev, dt), ks)  # (L, L)
        rand, expected = layer_baseline(d, ks, draws, seed, dev, dt)
        grids.append(LayerGrid(
            module_type=module_type, blocks=tuple(s.key.block for s in members), names=tuple(s.name for s in members),
            dim=d, ks=tuple(ks), phi=grid.cpu().double(), random_phi=rand, expected_phi=expected,
            block_names=tuple(s.key.block_name for s in members),
        ))
    return grids


def _both_grids(out: list[LayerGrid], inn: list[LayerGrid]) -> list[LayerGrid]:
    """``side='both'``: each output-side grid averaged with the input-side grid of the same layers."""
    by_names = {g.names: g for g in inn}
    grids = []
    for g in out:
        h = by_names.get(g.names)
        if h is None:
            raise ConfigError(f"side='both' needs one shape per module type; {g.module_type} has layers of "
                              "several shapes. Use side='out' or side='in'.")
        grids.append(replace(g, phi=(g.phi + h.phi) / 2, random_phi=(g.random_phi + h.random_phi) / 2,
                             expected_phi=(g.expected_phi + h.expected_phi) / 2, dim_in=h.dim))
    return grids


@dataclass(frozen=True, eq=False)
class ModulePairSimilarity:
    """One module compared across two adapters.

    ``grid (k_a, k_b)``: φ(i, j) for ``i ≤ k_a``, ``j ≤ k_b``; ``angles_deg
    (min(k_a, k_b),)``: principal angles between the full subspaces, ascending;
    ``grassmann``: ``‖θ‖₂`` in radians.
    """

    name: str
    name_b: str
    key: LayerKey
    dim: int
    k_a: int
    k_b: int
    grid: torch.Tensor
    angles_deg: torch.Tensor
    grassmann: float
    baseline: PairBaseline
    #: ``side='both'``: the input space's dim (``dim`` is the output space's); ``grid`` is the mean of both
    #: sides' grids, ``angles_deg`` both sides' angles (ascending), ``grassmann`` the product-manifold
    #: distance ``sqrt(‖θ_out‖² + ‖θ_in‖²)``.
    dim_in: int | None = None

    @property
    def phi(self) -> float:
        """φ at ``i = j = min(k_a, k_b)``: the top directions of both, equally many."""
        m = min(self.k_a, self.k_b)
        return float(self.grid[m - 1, m - 1])

    @property
    def phi_full(self) -> float:
        """φ(k_a, k_b) = mean cos² of the principal angles between the full subspaces."""
        return float(self.grid[-1, -1])

    def to_dict(self, grids: bool = True) -> dict:
        # reshaped: φ at min(k), baselines grouped, the (k_a, k_b) grids optional
        b = self.baseline
        d = {
            "name": self.name, **key_fields(self.key), "dim": self.dim, "dim_in": self.dim_in,
            "k_a": self.k_a, "k_b": self.k_b,
            "phi": num(self.phi), "phi_full": num(self.phi_full), "angles_deg": as_list(self.angles_deg),
            "grassmann": num(self.grassmann),
            "random": {"phi": num(b.phi), "phi_full": num(b.phi_full), "angles_deg": as_list(b.angles_deg),
                       "grassmann": num(b.grassmann)},
            "expected": {"phi": num(b.expected_phi), "phi_full": num(b.expected_phi_full)},
        }
        if self.name_b != self.name:
            d["name_b"] = self.name_b
        if grids:
            d["grid"] = as_list(self.grid)
            d["random"]["grid"] = as_list(b.grid)
            d["expected"]["grid"] = as_list(b.expected_grid)
        return d


@dataclass(frozen=True, eq=False)
class AdapterSimilarity:
    """:func:`adapter_similarity`'s result: matched modules in layer order, and what did not match."""

    a: str
    b: str
    path_a: str
    path_b: str
    what: str
    side: str
    #: The largest k used on either side (each module's ``k_a``, ``k_b`` say what it used).
    k: int
    modules: tuple[ModulePairSimilarity, ...]
    unmatched_a: tuple[str, ...]
    unmatched_b: tuple[str, ...]
    draws: int
    seed: int
    notes: tuple[str, ...] = ()
    #: The k asked for (None: every direction); larger than ``k`` when it was clipped to the rank.
    k_requested: int | None = None

    def by_module_type(self) -> "OrderedDict[str, dict[str, float | None]]":
        """Mean φ (and its baselines) per module type, in first-seen order."""
        groups: OrderedDict[str, list[ModulePairSimilarity]] = OrderedDict()
        for m in self.modules:
            groups.setdefault(m.key.module, []).append(m)
        return OrderedDict((t, _means(ms)) for t, ms in groups.items())

    def summary(self) -> dict[str, float | None]:
        return _means(self.modules)

    def to_dict(self, grids: bool = True) -> dict:
        # reshaped: summaries per module type added, module grids optional
        return stamp("adapter_similarity", {
            "a": self.a, "b": self.b, "path_a": self.path_a, "path_b": self.path_b,
            "what": self.what, "side": self.side, "side_note": side_note(self.what, self.side), "k": self.k,
            "k_requested": self.k_requested, "baseline": {"draws": self.draws, "seed": self.seed},
            "summary": self.summary(), "by_module_type": dict(self.by_module_type()),
            "modules": [m.to_dict(grids) for m in self.modules],
            "unmatched_a": list(self.unmatched_a), "unmatched_b": list(self.unmatched_b), "notes": list(self.notes),
        })


def _means(ms: Sequence[ModulePairSimilarity]) -> dict[str, float | None]:
    def mean(xs):
        xs = list(xs)
        return num(sum(xs) / len(xs)) if xs else None
    return {
        "modules": len(ms),
        "phi": mean(m.phi for m in ms), "random_phi": mean(m.baseline.phi for m in ms),
        "expected_phi": mean(m.baseline.expected_phi for m in ms),
        "grassmann": mean(m.grassmann for m in ms), "random_grassmann": mean(m.baseline.grassmann for m in ms),
    }


def adapter_similarity(
    adapter_a: Adapter,
    adapter_b: Adapter,
    *,
    what: str = "delta",
    k: int | None = None,
    side: str | None = None,
    draws: int = DRAWS,
    compute: Compute | None = None,
    **options,
) -> AdapterSimilarity:
    """Compare two adapters module by module (matched by name, backbone prefixes bridged).

    Works across ranks (r=8 vs r=64: ``k_a ≠ k_b``; φ at ``min(k_a, k_b)``). ``side``: ``out``
    (default: ΔW's output space), ``in`` or ``both`` (:data:`~.subspaces.SIDE_WHY`). ``what='base'`` is
    refused: two adapters on one base have the same base subspaces.
    """
    return pairwise_similarity([adapter_a, adapter_b], what=what, k=k, side=side, draws=draws,
                               compute=as_compute(compute, **options))[0]


def pairwise_similarity(
    adapters: Sequence[Adapter],
    *,
    what: str = "delta",
    k: int | None = None,
    side: str | None = None,
    draws: int = DRAWS,
    compute: Compute | None = None,
    **options,
) -> tuple[AdapterSimilarity, ...]:
    """:func:`adapter_similarity` for every pair ``(i < j)`` of ``adapters``; each adapter decomposed once."""
    side = resolve_side(what, side)
    if what == "base":
        raise ConfigError("what='base' compares a base with itself when given two adapters; "
                          "use it with one adapter (layers × layers), or what=delta|A|B.")
    if len(adapters) < 2:
        raise ConfigError(f"adapter similarity needs at least two adapters; got {len(adapters)}.")
    cx = as_compute(compute, **options)
    subs = [adapter_subspaces_by_side(a, what=what, k=k, side=side, compute=cx) for a in adapters]
    out = []
    for i, j in itertools.combinations(range(len(adapters)), 2):
        per_side = [_compare(adapters[i], adapters[j], subs[i][sd], subs[j][sd], what, sd, k, cx, draws)
                    for sd in sides_of(side)]
        out.append(per_side[0] if len(per_side) == 1 else _both_pairs(*per_side))
    return tuple(out)


def _both_pairs(out: AdapterSimilarity, inn: AdapterSimilarity) -> AdapterSimilarity:
    """``side='both'``: every module's output- and input-side comparisons combined (:class:`ModulePairSimilarity`)."""
    by_name = {m.name: m for m in inn.modules}
    return replace(out, side="both", modules=tuple(_both_module(m, by_name[m.name]) for m in out.modules))


def _both_module(o: ModulePairSimilarity, i: ModulePairSimilarity) -> ModulePairSimilarity:
    bo, bi = o.baseline, i.baseline
    base = PairBaseline(
        dim=bo.dim, k_a=bo.k_a, k_b=bo.k_b, grid=(bo.grid + bi.grid) / 2,
        expected_grid=(bo.expected_grid + bi.expected_grid) / 2,
        angles_deg=torch.sort(torch.cat([bo.angles_deg, bi.angles_deg])).values,
        grassmann=math.hypot(bo.grassmann, bi.grassmann), draws=bo.draws,
    )
    return replace(o, grid=(o.grid + i.grid) / 2, angles_deg=torch.sort(torch.cat([o.angles_deg, i.angles_deg])).values,
                   grassmann=math.hypot(o.grassmann, i.grassmann), baseline=base, dim_in=i.dim)


def _compare(a: Adapter, b: Adapter, sa: dict[str, Subspace], sb: dict[str, Subspace], what, side, k,
             cx: Compute, draws: int) -> AdapterSimilarity:
    dev, dt, seed = cx.device, cx.dtype, cx.seed
    by_norm = {normalize_module_path(n): n for n in sb}
    pairs, unmatched_a, bad = [], [], []
    for name in sa:
        nb = by_norm.pop(normalize_module_path(name), None)
        if nb is None:
            unmatched_a.append(name)
        elif sa[name].dim != sb[nb].dim:
            bad.append(f"'{name}' in {a.label} spans R^{sa[name].dim}, '{nb}' in {b.label} R^{sb[nb].dim}")
        else:
            pairs.append((sa[name], sb[nb]))
    if bad:
        raise ShapeError(f"{len(bad)} matching module(s) have different shapes: {'; '.join(bad[:3])}. "
                         "Compare adapters trained on the same architecture.")
    if not pairs:
        raise KeyMatchError(
            f"{a.label} ({a.path}) and {b.label} ({b.path}) have no LoRA module in common (e.g. {unmatched_a[:2]} vs "
            f"{sorted(by_norm.values())[:2]}); compare adapters on the same modules of the same architecture."
        )
    # One batched φ grid and principal-angle call per (d, k_a, k_b).
    groups: OrderedDict[tuple[int, int, int], list[tuple[Subspace, Subspace]]] = OrderedDict()
    for x, y in pairs:
        groups.setdefault((x.dim, x.k, y.k), []).append((x, y))
    results: dict[str, ModulePairSimilarity] = {}
    for (d, ka, kb), members in groups.items():
        Ua = torch.stack([x.basis for x, _ in members]).to(dev, dt)  # (N, d, k_a)
        Ub = torch.stack([y.basis for _, y in members]).to(dev, dt)  # (N, d, k_b)
        grid = phi_grid(Ua, Ub).cpu().double()  # (N, k_a, k_b)
        theta = principal_angles(Ua, Ub).cpu().double()  # (N, min)
        base = pair_baseline(d, ka, kb, draws, seed, dev, dt)
        for t, (x, y) in enumerate(members):
            results[x.name] = ModulePairSimilarity(
                name=x.name, name_b=y.name, key=x.key, dim=d, k_a=ka, k_b=kb, grid=grid[t],
                angles_deg=torch.rad2deg(theta[t]), grassmann=float(torch.linalg.vector_norm(theta[t])),
                baseline=base,
            )
    modules = in_layer_order(results.values())
    return AdapterSimilarity(
        a=a.label, b=b.label, path_a=str(a.path), path_b=str(b.path), what=what, side=side,
        k=max(max(m.k_a, m.k_b) for m in modules), modules=modules,
        unmatched_a=tuple(unmatched_a), unmatched_b=tuple(sorted(by_norm.values())), draws=draws, seed=seed,
        notes=zero_note(sa, what, a.label) + zero_note(sb, what, b.label), k_requested=k,
    )
