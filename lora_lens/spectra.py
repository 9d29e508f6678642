"""Spectra of LoRA updates: singular values of ``ΔW = s·B A`` and what they say (docs/maths.md §1).

For every module, the ``k = min(r, m, n)`` singular values ``σ_1 ≥ … ≥ σ_k ≥ 0``
of the update (the scaling ``s`` included; the same for ``ΔW`` and for the
``ΔWᵀ`` a GPT-2 Conv1D stores, so they hold in the base weight's layout too),
computed factored, never forming ``ΔW``, and these metrics:

- ``energy``: the energy curve ``E_j = Σ_{i≤j} σ_i² / Σ σ_i²`` (``j = 1..k``);
- ``fro_norm``: ``‖ΔW‖_F = ‖σ‖₂``;
- ``effective_rank`` (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = σ_i / Σ σ``,
  ``H(p) = −Σ p_i log p_i`` (``0 log 0 = 0``); between 1 and the number of
  non-zero σ, equal to it when they are all equal;
- ``stable_rank``: ``Σ σ_i² / σ_1²`` = ``‖ΔW‖_F² / ‖ΔW‖₂²``, in ``[1, k]``;
- ``rank_at_energy`` (PEFT's convention, ``peft.tuners.lora.conversion
  ._find_cutoff_index``): the smallest ``j`` with ``Σ_{i≤j} σ_i² ≥ f · Σ σ_i²``,
  an *energy* (explained variance) fraction ``f``;
- ``rank_at_fro`` (kohya's ``sv_fro``, ``networks/resize_lora.py``): the
  smallest ``j`` with ``sqrt(Σ_{i≤j} σ_i²) / ‖σ‖₂ ≥ f``, a *Frobenius-norm*
  fraction (= energy fraction ``f²``); kohya additionally clamps to
  ``[1, k − 1]`` when resizing, which we do not: this is the plain definition.

A zero update (``B = 0``, as PEFT initializes it) has all ``σ = 0`` and, by our
convention, rank 0 in every sense: ``effective_rank = stable_rank =
rank_at_energy = rank_at_fro = 0``, ``fro_norm = 0`` and an energy curve of
ones (nothing is left to capture at any rank). No NaN is ever produced.
(PEFT's cut-off would say 1 for a zero spectrum; kohya's would divide by zero.)

All metrics are computed in float64 on one zero-padded ``(N, k_max)`` tensor
for every module at once (padding zeros change none of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .compute import Compute, as_compute
from .decompose import adapter_singular_values
from .errors import ConfigError
from .io.formats import load_adapter
from .jsonable import JsonFields, stamp
from .types import Adapter, LoraModule

#: What the JSON output says about the numbers it holds.
CONVENTIONS = {
    "singular_values": "of ΔW = scaling·B·A (scaling included), descending, k = min(r, m, n); identical for the "
                       "stored layout (ΔWᵀ for Conv1D/Embedding)",
    "energy": "cumulative energy Σ_{i≤j} σ_i² / Σ σ_i², j = 1..k",
    "fro_norm": "‖ΔW‖_F = sqrt(Σ σ_i²)",
    "effective_rank": "Roy & Vetterli: exp(−Σ p_i log p_i), p_i = σ_i / Σ σ",
    "stable_rank": "Σ σ_i² / σ_1²",
    "rank_at_energy": "PEFT's convention: smallest j with Σ_{i≤j} σ_i² ≥ energy_fraction · Σ σ_i²",
    "rank_at_fro": "kohya's sv_fro: smallest j with sqrt(Σ_{i≤j} σ_i²) / ‖σ‖ ≥ fro_fraction (no clamping)",
    "zero_update": "all σ = 0 → every rank metric 0, fro_norm 0, energy curve all 1",
}


def energy_curve(S: torch.Tensor) -> torch.Tensor:
    """``E_j = Σ_{i≤j} σ_i² / Σ σ_i²`` for ``S (..., k)``: float64 ``(..., k)``; a zero spectrum → all ones."""
    cum = (S.to(torch.float64) ** 2).cumsum(-1)  # (..., k)
    total = cum[..., -1:]  # (..., 1)
    zero = total <= 0
    return torch.where(zero, torch.ones_like(cum), cum / torch.where(zero, torch.ones_like(total), total))


def rank_at_energy(S: torch.Tensor, fraction: float) -> torch.Tensor:
    """The one "rank at energy": smallest ``j`` with ``Σ_{i≤j} σ_i² ≥ fraction · Σ σ_i²`` (PEFT's
    ``_find_cutoff_index`` arithmetic), int64 ``(...)`` for ``S (..., k)`` descending; 0 for a zero update.

    Used by :func:`spectrum_metrics` and :func:`lora_lens.methods.reduce.reduce_rank` alike.
    """
    _check_fraction("energy", fraction)
    cum = (S.to(torch.float64) ** 2).cumsum(-1)  # (..., k)
    total = cum[..., -1]
    # "smallest j satisfying" = 1 + #{j : not satisfied}, because cum is non-decreasing
    r = (cum < fraction * total.unsqueeze(-1)).sum(-1) + 1
    return torch.where(total <= 0, 0, r)


def spectrum_metrics(S: torch.Tensor, energy: float = 0.9, fro: float = 0.9) -> dict[str, torch.Tensor]:
    """Every metric of the module docstring for a batch of spectra, at once.

    ``S (..., k)`` non-negative and descending (zero padding allowed), any
    float dtype; computed in float64. Returns ``energy (..., k)`` and
    ``fro_norm``, ``effective_rank``, ``stable_rank`` (float64 ``(...)``) and
    ``rank_at_energy``, ``rank_at_fro`` (int64 ``(...)``).
    """
    _check_fraction("energy", energy)
    _check_fraction("fro", fro)
    S = S.to(torch.float64)
    sq = S * S  # (..., k)
    cum = sq.cumsum(-1)  # (..., k)
    total = cum[..., -1]  # (...)
    zero = total <= 0
    safe_total = torch.where(zero, torch.ones_like(total), total)
    # kohya: cs/total >= f², in its owner's arithmetic so ties match exactly (PEFT's: rank_at_energy)
    r_fro = (cum / safe_total.unsqueeze(-1) < fro ** 2).sum(-1) + 1
    l1 = S.sum(-1)
    p = S / torch.where(zero, torch.ones_like(l1), l1).unsqueeze(-1)  # (..., k)
    entropy = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)).sum(-1)
    top = S[..., 0]
    stable = total / torch.where(zero, torch.ones_like(top), top * top)
    z64 = torch.zeros_like(total)
    return {
        "energy": energy_curve(S),
        "fro_norm": total.sqrt(),
        "effective_rank": torch.where(zero, z64, torch.exp(entropy)),
        "stable_rank": torch.where(zero, z64, stable),
        "rank_at_energy": rank_at_energy(S, energy),
        "rank_at_fro": torch.where(zero, 0, r_fro),
    }


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"--{name} {value}: expected a fraction in (0, 1], e.g. 0.9 for 90 %.")


@dataclass(frozen=True, eq=False)
class SpectrumReport(JsonFields):
    """The spectrum of one LoRA module's update and its metrics (see the module docstring).

    ``shape`` is ``(m, n)`` in PyTorch's layout, ``base_shape`` as the base
    stores it; ``singular_values`` and ``energy`` are float64 ``(k,)`` tensors,
    ``k = min(rank, m, n)``.
    """

    name: str
    block: int | None
    module_type: str
    shape: tuple[int, int]
    base_shape: tuple[int, int]
    layout: str
    rank: int
    alpha: float
    scaling: float
    singular_values: torch.Tensor
    energy: torch.Tensor
    fro_norm: float
    effective_rank: float
    stable_rank: float
    rank_at_energy: int
    rank_at_fro: int
    #: The block's readable path where ``block`` is a position code (diffusion UNets), else ``None``.
    block_name: str | None = None

    @property
    def top_singular_value(self) -> float:
        return float(self.singular_values[0]) if len(self.singular_values) else 0.0



@dataclass(frozen=True)
class TypeSummary:
    """One module type (``self_attn.q_proj``) across its layers: counts, ranks, and mean/min/max of the metrics.

    ``stats`` maps a metric name (``effective_rank``, ``stable_rank``,
    ``rank_at_energy``, ``rank_at_fro``, ``fro_norm``, ``top_singular_value``)
    to ``{"mean", "min", "max"}``; ``top_singular_values`` lists σ_1 per layer in
    block order.
    """

    module_type: str
    layers: int
    blocks: tuple[int | None, ...]
    ranks: tuple[int, ...]
    shapes: tuple[tuple[int, int], ...]
    stats: dict[str, dict[str, float]] = field(hash=False)
    top_singular_values: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        # reshaped: the metric stats sit at the top level next to the counts
        return {"module_type": self.module_type, "layers": self.layers, "blocks": list(self.blocks),
                "ranks": list(self.ranks), "shapes": [list(s) for s in self.shapes], **self.stats,
                "top_singular_values": list(self.top_singular_values)}


@dataclass(frozen=True, eq=False)
class AdapterSpectra:
    """Spectra of every module of one adapter: ``layers`` in the adapter's order, ``summary`` per module type."""

    label: str
    path: str | None
    layers: tuple[SpectrumReport, ...]
    summary: dict[str, TypeSummary]
    energy_fraction: float
    fro_fraction: float
    device: str
    dtype: str
    flags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {rep.name: rep for rep in self.layers})

    def __getitem__(self, name: str) -> SpectrumReport:
        return self._by_name[name]  # type: ignore[attr-defined]

    def to_dict(self) -> dict:
        """JSON-ready: ``adapter``, ``settings``, ``conventions``, ``summary`` (by module type), ``layers``."""
        # reshaped: adapter and settings grouped, the conventions shipped with the numbers
        return stamp("spectra", {
            "adapter": {"label": self.label, "path": self.path, "flags": list(self.flags)},
            "settings": {"energy_fraction": self.energy_fraction, "fro_fraction": self.fro_fraction,
                         "device": self.device, "dtype": self.dtype},
            "conventions": CONVENTIONS,
            "summary": {t: s.to_dict() for t, s in self.summary.items()},
            "layers": [rep.to_dict() for rep in self.layers],
        })


def adapter_spectra(
    adapter: Adapter | Sequence[LoraModule] | str | Path,
    *,
    energy: float = 0.9,
    fro: float = 0.9,
    adapter_name: str | None = None,
    compute: Compute | None = None,
    **options,
) -> AdapterSpectra:
    """Spectrum and metrics of every module of an adapter (or a folder path, loaded with :func:`load_adapter`).

    Singular values come from :func:`~lora_lens.decompose.adapter_singular_values`
    (batched per ``(m, n, r)`` group on ``device``, exact, no ``ΔW`` formed);
    the metrics are then computed for all modules at once in float64.
    ``energy``/``fro``: the fractions for ``rank_at_energy`` (PEFT) and
    ``rank_at_fro`` (kohya ``sv_fro``). ``compute`` (or its fields as keywords:
    ``device``, ``dtype``, ``max_memory`` in bytes per chunk, ``progress``) says where and how.
    """
    _check_fraction("energy", energy)
    _check_fraction("fro", fro)
    if isinstance(adapter, (str, Path)):
        adapter = load_adapter(adapter, adapter_name)
    cx = as_compute(compute, **options)
    modules = list(adapter)
    if not modules:
        raise ConfigError("the adapter holds no LoRA modules; nothing to decompose.")
    svals = adapter_singular_values(modules, compute=cx)
    rows = [svals[m.name] for m in modules]
    S = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(torch.float64)  # (N, k_max), zero-padded
    met = spectrum_metrics(S, energy, fro)
    ks = [len(r) for r in rows]
    scalars = {name: met[name].tolist() for name in ("fro_norm", "effective_rank", "stable_rank",
                                                     "rank_at_energy", "rank_at_fro")}
    layers = tuple(
        SpectrumReport(
            name=m.name, block=m.key.block, block_name=m.key.block_name, module_type=m.key.module, shape=m.shape, base_shape=m.base_shape,
            layout=m.layout, rank=m.rank, alpha=m.alpha, scaling=m.scaling,
            singular_values=S[i, :k], energy=met["energy"][i, :k],
            **{name: vals[i] for name, vals in scalars.items()},
        )
        for i, (m, k) in enumerate(zip(modules, ks))
    )
    is_adapter = isinstance(adapter, Adapter)
    return AdapterSpectra(
        label=adapter.label if is_adapter else "modules",
        path=str(adapter.path) if is_adapter else None,
        layers=layers,
        summary=summarize(layers, S[:, 0], met),
        energy_fraction=energy, fro_fraction=fro, device=str(cx.device), dtype=cx.dtype_name,
        flags=tuple(adapter.flags) if is_adapter else (),
    )


_SUMMARY_METRICS = ("effective_rank", "stable_rank", "rank_at_energy", "rank_at_fro", "fro_norm")


def summarize(layers: Sequence[SpectrumReport], top: torch.Tensor, met: dict[str, torch.Tensor]) -> dict[str, TypeSummary]:
    """Per module type: mean/min/max of each metric over its layers (one masked reduction per type).

    ``top (N,)`` is σ_1 per layer and ``met`` the batched metrics, both in the
    order of ``layers``.
    """
    types = {t: i for i, t in enumerate(dict.fromkeys(rep.module_type for rep in layers))}
    type_idx = torch.tensor([types[rep.module_type] for rep in layers])  # (N,)
    cols = {name: met[name].to(torch.float64) for name in _SUMMARY_METRICS}
    cols["top_singular_value"] = top.to(torch.float64)
    out = {}
    for t, t_i in types.items():
        mask = type_idx == t_i
        reps = [rep for rep, keep in zip(layers, mask.tolist()) if keep]
        stats = {name: {"mean": float(v[mask].mean()), "min": float(v[mask].min()), "max": float(v[mask].max())}
                 for name, v in cols.items()}
        tops = cols["top_singular_value"][mask].tolist()
        order = sorted(range(len(reps)), key=lambda j: -1 if reps[j].block is None else reps[j].block)
        out[t] = TypeSummary(
            module_type=t, layers=len(reps), blocks=tuple(reps[j].block for j in order),
            ranks=tuple(sorted({rep.rank for rep in reps})), shapes=tuple(dict.fromkeys(rep.shape for rep in reps)),
            stats=stats, top_singular_values=tuple(tops[j] for j in order),
        )
    return out
