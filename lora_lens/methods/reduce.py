"""Rank reduction of a trained adapter: truncate each module's SVD (docs/maths.md §1, §9).

Each ``ΔW = s·B A = U S Vh`` is decomposed without forming it
(:func:`~lora_lens.decompose.decompose_adapter`) and cut to ``k`` directions:
a fixed ``rank``, or the smallest ``k`` whose ``Σ_{i≤k} σ_i² / Σ σ_i²``
reaches ``energy`` (PEFT's convention, ``peft.tuners.lora.conversion``). The
new factors split ``S`` evenly, ``B = U_k S_k^½ (m, k)``, ``A = S_k^½ Vh_k
(k, n)``, with ``alpha = k`` so ``s = 1``: ``s·B A`` is the best rank-``k``
approximation of ``ΔW`` (Eckart–Young), its singular values exactly the top ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..compute import Compute
from ..decompose import decompose_adapter
from ..errors import ConfigError
from ..io.formats import load_adapter
from ..io.peft import save_peft_adapter
from ..jsonable import JsonFields
from ..io.tensors import open_tensor_file
from ..keys import parse_peft_key, strip_peft_prefix
from ..spectra import rank_at_energy
from ..types import Adapter, LoraModule
from .result import provenance


@dataclass(frozen=True)
class ReducedAdapter(JsonFields):
    """What :func:`reduce_rank` wrote: one record per module (ranks before/after, energy kept)."""

    KIND = "reduced_adapter"

    out_dir: Path
    records: tuple[dict, ...]
    summary: dict


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The rank kept for ``energy``: :func:`lora_lens.spectra.rank_at_energy`, but at least 1.

    A zero update has energy rank 0 (one definition, in ``spectra``); a PEFT
    module needs ``r ≥ 1``, so it is written as one zero pair.
    """
    return max(1, int(rank_at_energy(S, energy)))


def reduce_rank(
    adapter: Adapter | str | Path,
    rank: int | None = None,
    energy: float | None = None,
    *,
    out_dir: str | Path,
    overwrite: bool = False,
    compute: Compute | None = None,
    **options,
) -> ReducedAdapter:
    """Write a PEFT adapter whose every module keeps its top ``rank`` (or ``energy``) directions.

    A module already at or below ``rank`` keeps all of its directions.
    ``modules_to_save`` copies are carried over; DoRA adapters and LoRA biases
    are refused (truncating ``s·B A`` would drop the rest of the update).
    Factors are written in the adapter's own dtype.
    """
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (--rank R) or energy (--energy F).")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer; got {rank!r}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ConfigError(f"energy must be a fraction in (0, 1]; got {energy}.")
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    if adapter.format != "peft":
        # The reduced adapter is written in PEFT's layout under the source's module names; for other formats
        # those names and the component split are convert's job, so reduce goes after it.
        raise ConfigError(f"{adapter.path}: is a {adapter.format} adapter; reduce reads and writes PEFT adapters. "
                          f"Convert it first (lora-lens convert {adapter.path} --to peft -o DIR), then reduce DIR.")
    if adapter.settings.use_dora or any(o.name.endswith(("lora_magnitude_vector", "lora_B.bias"))
                                        for o in adapter.other_tensors):
        raise ConfigError(f"{adapter.path}: DoRA magnitudes or LoRA biases are part of this adapter's update; "
                          "truncating s·B·A alone would change it. Only plain LoRA adapters can be reduced.")
    spectra = decompose_adapter(adapter, compute=compute, **options)
    modules, records = [], []
    for mod in adapter:
        sp = spectra[mod.name]
        k = min(rank, sp.k) if rank is not None else rank_for_energy(sp.S, energy)
        root = sp.S[:k].clamp_min(0).sqrt()
        B = (sp.U[:, :k] * root).to(mod.dtype)  # (m, k)
        A = (root[:, None] * sp.Vh[:k]).to(mod.dtype)  # (k, n)
        modules.append(LoraModule(mod.name, mod.key, A.contiguous(), B.contiguous(), alpha=float(k), scaling=1.0,
                                  layout=mod.layout))
        total = float((sp.S.double() ** 2).sum())
        kept = float((sp.S[:k].double() ** 2).sum()) / total if total > 0 else 1.0
        records.append({"module": mod.name, "rank_before": mod.rank, "rank_after": k,
                        "rank_at_energy": int(rank_at_energy(sp.S, energy)) if energy is not None else None,
                        "energy_kept": kept,
                        "sigma_kept_last": float(sp.S[k - 1]), "sigma_dropped_first": float(sp.S[k]) if k < sp.k else None})
    params = {"rank": rank, "energy": energy}
    s = adapter.settings
    save_peft_adapter(
        out_dir, modules, base_model_name_or_path=s.base_model_name_or_path, task_type=s.raw.get("task_type"),
        modules_to_save=s.modules_to_save or None, extra_tensors=_other_tensors(adapter),
        metadata=provenance("reduce", params, [adapter.path]), overwrite=overwrite,
    )
    before = sum(m.num_parameters for m in adapter)
    after = sum(m.num_parameters for m in modules)
    summary = {"modules": len(modules), "parameters_before": before, "parameters_after": after,
               "energy_kept_min": min(r["energy_kept"] for r in records), **params}
    return ReducedAdapter(Path(out_dir), tuple(records), summary)


def _other_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Non-LoRA tensors (``modules_to_save`` copies) keyed without PEFT's prefix, for ``save_peft_adapter``."""
    if not adapter.other_tensors or adapter.weights_file is None:
        return {}
    store = open_tensor_file(adapter.weights_file)
    return {strip_peft_prefix(k): store.get(k, validate=False) for k in store.names()
            if parse_peft_key(k).role == "other"}
