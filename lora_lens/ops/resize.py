"""Resize an adapter: keep each module's top singular directions (``lora-lens resize``, docs/weights.md "Resize").

Each ``ΔW = s·B A (m, n)`` is decomposed without forming it
(:func:`~lora_lens.decompose.decompose_adapter`: QR of both factors and an
``(r, r)`` SVD, ``U (m, r)``, ``S (r,)``, ``Vh (r, n)``) and cut to the rank
``k`` a rule picks (:func:`~lora_lens.ops.rank_rules.select_rank`: a fixed
rank, or sd-scripts' ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``, or PEFT's
``energy``; capped by ``max_rank``, at least 1). The scale ``s`` is kept and
``S`` is folded into the factors,

    B' = U_k √(S_k/|s|)  (m, k),   A' = sign(s) √(S_k/|s|) Vh_k  (k, n),

so ``s·B' A' = U_k S_k Vh_k``, the best rank-``k`` approximation of ``ΔW``
(Eckart–Young), and each format's scale convention stays as it was: PEFT's
``alpha = s·k`` (``s·√k`` with rsLoRA) per module through ``rank_pattern`` /
``alpha_pattern``, kohya's per-module ``alpha = s·k``, MLX's one global scale.
What is dropped is known exactly from the spectrum: ``‖ΔW − ΔW_k‖_F =
√(Σ_{i>k} σ_i²)``. LoKr / LoHa / AdaLoRA modules come out as plain LoRA pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..compute import Compute
from ..compute import as_compute
from ..decompose import decompose_adapter, fold_adapter, split_spectrum
from ..errors import ConfigError
from ..io.formats import load_adapter
from ..io.formats.factors import SCALE_UNKNOWN, settings_of
from ..methods.result import provenance
from ..types import Adapter, LoraModule, LoraSettings
from .output import Operated, WrittenResult, check_finite, check_target, default_target, write_result
from .rank_rules import check_rank_rule, select_rank


#: A resized adapter (not written) and one record per module (see :func:`truncation_record`).
Resized = Operated


@dataclass(frozen=True)
class ResizeResult(WrittenResult):
    """What :func:`resize` wrote: the folders, the format, one record per module, a summary, notes."""

    KIND = "resized_adapter"


def rank_rule(rank: int | None, method: str | None, param: float | None,
              max_rank: int | None = None) -> tuple[str, float]:
    """``(method, param)`` from ``--rank R`` or ``--method M --param P``; exactly one, checked."""
    if (rank is None) == (method is None):
        raise ConfigError("give exactly one of --rank R or --method M --param P.")
    if rank is not None:
        if param is not None:
            raise ConfigError(f"--param {param:g} belongs to --method; with --rank {rank} drop it (or use --method M "
                              "--param P instead of --rank).")
        method, param = "rank", rank
    elif param is None:
        raise ConfigError(f"--method {method} needs --param P (see docs/weights.md for its range).")
    check_rank_rule(method, param, max_rank)
    return method, float(param)


def truncation_record(S: torch.Tensor, k: int) -> dict:
    """Energy kept and Frobenius error of keeping the top ``k`` of ``S (r,)``, exact from the spectrum.

    ``fro_error = √(Σ_{i>k} σ_i²) = ‖ΔW − ΔW_k‖_F``; ``fro_error_rel`` divides by ``‖ΔW‖_F``.
    """
    sq = S.detach().to("cpu", torch.float64) ** 2
    total, dropped = float(sq.sum()), float(sq[k:].sum())
    return {"energy_kept": (total - dropped) / total if total > 0 else 1.0, "fro_error": dropped ** 0.5,
            "fro_error_rel": (dropped / total) ** 0.5 if total > 0 else 0.0,
            "sigma_kept_last": float(S[k - 1]) if 0 < k <= S.numel() else None,
            "sigma_dropped_first": float(S[k]) if k < S.numel() else None}


#: Largest ``eps · cond`` of a module's factors at which the folded factors of
#: :func:`~lora_lens.decompose.fold_adapter` are used (their relative error is about that);
#: above it the module goes through :func:`~lora_lens.decompose.decompose_adapter` (``Q`` formed).
FOLD_TOL = 1e-5


Folded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def folded(adapter: Adapter | list[LoraModule], compute: Compute | None, **options) -> dict[str, Folded]:
    """``{name: (S (r,), Bf (m, r), Af (r, n))}`` with ``s·Bf Af = ΔW`` and ``(σᵢ/|s|)^½`` in column / row ``i``.

    The folded kernel where the factors are well conditioned, the exact path (``Q`` formed) elsewhere.
    """
    cx = as_compute(compute, **options)
    eps = torch.finfo(cx.dtype).eps
    out = {n: (S, Bf, Af) for n, (S, Bf, Af, cond) in fold_adapter(adapter, compute=cx).items()
           if cond * eps <= FOLD_TOL}
    rest = {m.name: m for m in adapter if m.name not in out}
    for name, sp in (decompose_adapter(list(rest.values()), compute=cx).items() if rest else ()):
        out[name] = (sp.S, *split_spectrum(sp, rest[name].scaling))
    return out


def fold_factors(Bf: torch.Tensor, Af: torch.Tensor, k: int, scaling: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` folded factors in ``dtype``: ``scaling · B A`` is the best rank-``k`` approximation."""
    if scaling == 0:
        return torch.zeros(Bf.shape[0], k, dtype=dtype), torch.zeros(k, Af.shape[1], dtype=dtype)
    return Bf[:, :k].to(dtype), Af[:k].to(dtype)


def alpha_for(scaling: float, rank: int, rslora: bool) -> float:
    """The ``alpha`` that gives ``scaling`` at ``rank``: ``s·r``, or ``s·√r`` with rsLoRA."""
    return scaling * (rank ** 0.5 if rslora else rank)


def result_format(fmt: str) -> str:
    """The reader name of a plain-LoRA result of an adapter read as ``fmt``."""
    return "peft" if fmt.startswith("peft") else "kohya" if fmt == "lycoris" else fmt


def result_settings(modules: list[LoraModule], old: LoraSettings | None = None) -> LoraSettings:
    """``old`` with ``r`` / ``lora_alpha`` and the patterns recomputed for ``modules`` (plain LoRA)."""
    new = settings_of(modules)
    if old is None:
        return new
    return replace(old, r=new.r, lora_alpha=new.lora_alpha, rank_pattern=new.rank_pattern,
                   alpha_pattern=new.alpha_pattern, use_dora=False, peft_type="LORA")


def refuse_dora(adapter: Adapter, what: str) -> None:
    """DoRA magnitudes or LoRA biases are part of the update; ``s·B·A`` alone would change it."""
    if adapter.settings.use_dora or any(f.startswith("DoRA") for f in adapter.flags) or any(
            o.name.endswith(("lora_magnitude_vector", "lora_B.bias")) for o in adapter.other_tensors):
        raise ConfigError(f"{adapter.path}: DoRA magnitudes or LoRA biases are part of this adapter's update; "
                          f"{what} acts on s·B·A alone and would change it. Only plain LoRA/LoKr/LoHa adapters can be "
                          f"{what}d.")


_KIND_NAMES = {"lokr": "LoKr", "loha": "LoHa", "adalora": "AdaLoRA"}


def kind_note(adapter: Adapter) -> list[str]:
    """The notes saying LoKr / LoHa / AdaLoRA modules come out as plain LoRA, and that a scale the input did not
    state (read as 1) is written as a stated one (empty when neither applies)."""
    notes = [f"{adapter.path}: {f.split(';', 1)[0]}; read as s = 1 and written with s = 1, a scale the input did "
             "not state." for f in adapter.flags if f.startswith(SCALE_UNKNOWN)]
    kinds = sorted({m.kind for m in adapter.modules} - {"lora"})
    if not kinds:
        return notes
    n = sum(m.kind != "lora" for m in adapter.modules)
    return [f"{adapter.path}: {n} {'/'.join(_KIND_NAMES.get(k, k) for k in kinds)} module(s) are written as plain "
            "LoRA pairs (s·B·A), not in their own parameterization."] + notes


def resize_adapter(
    adapter: Adapter,
    *,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    compute: Compute | None = None,
    **options,
) -> Resized:
    """Every module of ``adapter`` cut to the rank its rule keeps (see the module docstring); nothing written.

    Returns a new :class:`Adapter` (factors in each module's dtype, scale kept,
    ``kind`` lora) and per module ``rank_before``, ``rank_after``,
    ``energy_kept``, ``fro_error``, ``fro_error_rel``.
    """
    rule, p = rank_rule(rank, method, param, max_rank)
    refuse_dora(adapter, "resize")
    rslora = adapter.settings.use_rslora and adapter.format == "peft"
    factors = folded(adapter, compute, **options)
    modules, records = [], []
    for mod in adapter:
        S, Bf, Af = factors[mod.name]
        k = select_rank(S, rule, p, max_rank=max_rank)
        B, A = fold_factors(Bf, Af, k, mod.scaling, mod.dtype)
        modules.append(replace(mod, A=A, B=B, alpha=alpha_for(mod.scaling, k, rslora), kind="lora"))
        records.append({"module": mod.name, "kind": mod.kind, "rank_before": mod.rank, "rank_after": k,
                        **truncation_record(S, k)})
    notes = kind_note(adapter)
    fmt = result_format(adapter.format)
    others = adapter.other_tensors if adapter.format == "peft" else ()
    if adapter.other_tensors and not others:
        notes.append(f"{adapter.path}: {len(adapter.other_tensors)} tensor(s) that are not LoRA factors were not "
                     "carried over.")
    params = {"method": rule, "param": p, "max_rank": max_rank}
    out = replace(adapter, modules=tuple(modules), settings=result_settings(modules, adapter.settings),
                  other_tensors=tuple(others), format=fmt, weights_file=None,
                  metadata=provenance("resize", params, [adapter.path]))
    cx_dtype = as_compute(compute, **options).dtype
    if any(torch.finfo(m.dtype).max < torch.finfo(cx_dtype).max for m in modules):
        # factors narrower than the compute dtype can overflow when cast; in the compute dtype (or wider) they
        # are finite once S is (checked by fold_adapter / decompose_adapter), and write_result checks again
        check_finite(out, "resize")
    return Resized(out, tuple(records), tuple(notes))


def resize(
    source: Adapter | str | Path,
    out: str | Path,
    *,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    to: str | None = None,
    overwrite: bool = False,
    format: str | None = None,
    compute: Compute | None = None,
    **options,
) -> ResizeResult:
    """Read an adapter of any format, resize it (:func:`resize_adapter`), write it (``to``: its own format)."""
    rank_rule(rank, method, param, max_rank)  # refuse bad options before reading anything
    check_target(to)
    adapter = source if isinstance(source, Adapter) else load_adapter(source, format=format)
    res = resize_adapter(adapter, rank=rank, method=method, param=param, max_rank=max_rank, compute=compute,
                         **options)
    target = to or default_target(adapter.format)
    notes = list(res.notes)
    if result_format(adapter.format) != adapter.format and to is None:
        notes.append(f"{adapter.path}: read as {adapter.format}; written as {target}.")
    written = write_result(res.adapter, out, target, overwrite=overwrite)
    before, after = adapter.num_parameters, res.adapter.num_parameters
    recs = res.records
    summary = {"modules": len(recs), "parameters_before": before, "parameters_after": after,
               "energy_kept_min": min(r["energy_kept"] for r in recs),
               "fro_error_rel_max": max(r["fro_error_rel"] for r in recs),
               "rank": rank, "method": method if rank is None else "rank", "param": param, "max_rank": max_rank}
    return ResizeResult(Path(out), tuple(written), target, recs, summary, tuple(notes))
