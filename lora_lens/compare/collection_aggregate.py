"""Aggregating a collection: per-module results → the ``(N, N)`` matrices (:class:`CollectionSimilarity`).

Each module's ``(p, p)`` φ on ``settings.side`` (each pair at its own ``k``,
:mod:`.collection_kernel`) lands in the rows/columns of its ``p`` members;
per pair, the mean over the modules both adapters have (or the
``sqrt(‖ΔW_i‖·‖ΔW_j‖)``-weighted mean), per module type and overall, with the
random baseline aggregated the same way (its spread as the weighted
root-sum of variances).
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..jsonable import stamp
from .collection_kernel import ModuleResult
from .collection_plan import CollectionSettings
from .serialize import as_list, num
from .subspaces import side_note


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
        side = self.settings.side
        return stamp("collection", {
            "settings": self.settings.to_dict(),
            "adapters": [{"label": lab, "path": p, "norm": num(self.norms[i]),
                          "effective_rank": num(self.effective_rank[i])}
                         for i, (lab, p) in enumerate(zip(self.labels, self.paths))],
            "conventions": CONVENTIONS,
            "phi": as_list(self.phi), "random_phi": as_list(self.random_phi), "random_std": as_list(self.random_std),
            "common_modules": self.common.int().tolist(),
            "by_module_type": {t: as_list(self.by_type[t]) for t in types},
            "side": side, "side_note": side_note("delta", side),
            "modules": [{"name": m.name, "module_type": m.module_type, "shape": list(m.shape),
                         "members": list(m.members), "k": list(m.ks),
                         "mean_phi": num(_offdiag_mean(m.phi_on(side))),
                         "random_phi": num(_offdiag_mean(m.random_on(side)[0])),
                         "shared_rank": m.shared_rank,
                         "shared_energy": as_list(m.energy_both[:, m.shared_rank - 1])}
                        for m in self.modules],
            "partial_modules": self.partial, "skipped_modules": self.skipped,
            "shared_basis": {"energy_both_at_rank": as_list(at), "energy_left_at_rank": as_list(at_l),
                             "curve_both": as_list(curve), "curve_left": as_list(curve_l)},
            "notes": list(self.notes),
        })


CONVENTIONS = {
    "phi": "per module ‖U_iᵏᵀU_jᵏ‖_F²/k over the top-k left (output, side out) or right (input, side in) "
           "singular vectors of each ΔW = s·B·A, or the mean of both (side both), with the pair's own "
           "k = min(r_i, r_j) (or top_k, capped at it) — the number `lora-lens similarity` gives for the pair; "
           "averaged over the modules both adapters have (weighted by sqrt(‖ΔW_i‖·‖ΔW_j‖) when "
           "settings.weighted); 1 = same subspaces",
    "random_phi": "the same aggregate for Haar-random subspaces of each pair's k and side "
                  "(sampled mean; random_std its spread)",
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
        mu, var, _ = m.random_on(settings.side)  # (p, p) each: every pair at its own k
        for tag in ("all", m.module_type):
            a = acc.setdefault(tag, [z(), z(), z(), z()])
            a[0][grid] += w * m.phi_on(settings.side)
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
    clipped = [min(m.ks) for m in results if settings.top_k is not None and min(m.ks) < settings.top_k]
    if clipped:
        notes.append(f"top_k={settings.top_k} exceeds the smallest rank in {len(clipped)} of {len(results)} modules; "
                     f"those compare k = {_span(clipped)} directions (each pair's smaller rank) where a rank is "
                     "below top_k.")
    notes.append(side_note("delta", settings.side))
    return CollectionSimilarity(
        labels=tuple(labels), paths=tuple(paths), modules=tuple(results), phi=ratio(S, W), by_type=by_type,
        random_phi=ratio(MU, W), random_std=ratio(VAR.sqrt(), W), common=common, norms=sq.sqrt(),
        effective_rank=ratio(er, cnt), partial=partial, skipped=skipped, settings=settings, notes=tuple(notes),
    )


def _span(ks: list[int]) -> str:
    """``"4"`` or ``"2–4"``: the range of the k values used."""
    lo, hi = min(ks), max(ks)
    return str(lo) if lo == hi else f"{lo}–{hi}"
