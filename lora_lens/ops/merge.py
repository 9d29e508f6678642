"""Merge adapters: ``Σ wᵢ ΔWᵢ`` per module, exactly or at a rank (``lora-lens merge``, docs/weights.md "Merge").

For a module present in adapters ``i ∈ P`` with ``ΔWᵢ = sᵢ Bᵢ Aᵢ`` (``Bᵢ (m, rᵢ)``, ``Aᵢ (rᵢ, n)``):

- ``cat`` (exact, ranks add): ``B = [w₁s₁B₁ | w₂s₂B₂ | …] (m, Σrᵢ)``, ``A = [A₁; A₂; …] (Σrᵢ, n)``,
  scale 1, so ``B A = Σ wᵢ sᵢ Bᵢ Aᵢ``.
- ``svd``: the best rank-``R`` approximation of ``Σ wᵢ sᵢ Bᵢ Aᵢ``, computed factored: it is the
  ``cat`` adapter's SVD (:func:`~lora_lens.linalg.factored_svd`: QR of the stacked factors, an
  ``(Σrᵢ, Σrᵢ)`` SVD), truncated and folded as :mod:`.resize` does. ``ΔW`` is never formed.
- ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune``: PEFT's ``*_svd`` combinations
  (``peft.utils.merge_utils``, ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``):
  the anchor acts on the entries of the dense ``ΔWᵢ`` (in the base weight's stored layout, as
  PEFT's ``get_delta_weight`` returns it), then the merged matrix is cut to rank ``R`` by the
  project's dense SVD path (:func:`~lora_lens.decompose.decompose_matrices`, ``n_iter="auto"``:
  exact below 512, else iterated to a measured subspace accuracy).

``R`` defaults to the largest input rank (PEFT's ``svd_rank=None``). Random pruning (DARE) draws
one Bernoulli mask per adapter in adapter order from a generator seeded per module
(:func:`~lora_lens.compute.item_seed` of ``seed`` and the module name), so a module's result does not
depend on the others. Modules missing from some adapters merge the adapters that have them
(PEFT's rule; a note says how many); shapes that differ are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from ..compute import Compute, as_compute, item_seed
from ..decompose import decompose_matrices, split_spectrum
from ..errors import ConfigError, ShapeError
from ..io.formats import load_adapter
from ..methods.result import provenance
from ..types import Adapter, LoraModule
from .output import Operated, WrittenResult, check_finite, check_target, default_target, write_result
from .resize import fold_factors, folded, kind_note, refuse_dora, result_format, result_settings, truncation_record

#: ``--method`` values, in the order the help lists them.
MERGE_METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: The methods that prune entries of the dense ``ΔWᵢ`` (they need ``density``).
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
#: ``‖Σ wᵢΔWᵢ‖_F / (‖B_cat‖_F ‖A_cat‖_F)`` below this: the merged update is zero up to rounding (cancelled).
CANCELLED = 1e-5


#: A merged adapter (not written), one record per module, and notes.
Merged = Operated


@dataclass(frozen=True)
class MergeResult(WrittenResult):
    """What :func:`merge` wrote."""

    KIND = "merged_adapter"


def check_merge_options(n_adapters: int, weights: Sequence[float], method: str, rank: int | None,
                        density: float | None, majority_sign_method: str) -> None:
    """Refuse what cannot be merged, one line each: counts, method, rank, density, sign method."""
    if n_adapters < 1:
        raise ConfigError("merge needs at least one adapter.")
    if len(weights) != n_adapters:
        raise ConfigError(f"--weights has {len(weights)} value(s) for {n_adapters} adapter(s); "
                          "expected one weight per adapter, in the same order.")
    bad = [w for w in weights if not math.isfinite(float(w))]
    if bad:
        raise ConfigError(f"--weights {bad[0]!r} is not a finite number; expected finite weights.")
    if method not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method {method!r}; expected one of {', '.join(MERGE_METHODS)}.")
    if rank is not None and (int(rank) != rank or rank < 1):
        raise ConfigError(f"--rank {rank!r} must be an integer ≥ 1.")
    if method == "cat" and rank is not None:
        raise ConfigError("--rank with --method cat: cat keeps every direction (the ranks add); "
                          "use --method svd --rank R for a rank-R merge.")
    if method in PRUNING:
        if density is None:
            raise ConfigError(f"--method {method} needs --density D in (0, 1] (the fraction of entries kept).")
        if not (math.isfinite(density) and 0 < density <= 1):
            raise ConfigError(f"--density {density!r} must be in (0, 1] (the fraction of entries kept).")
    elif density is not None:
        raise ConfigError(f"--density applies to {', '.join(PRUNING)}, not to --method {method}.")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"--majority-sign-method {majority_sign_method!r}; expected total or frequency.")


def module_union(adapters: Sequence[Adapter]) -> tuple[dict[str, list[tuple[int, LoraModule]]], list[str]]:
    """``{module name: [(adapter index, module), …]}`` over every adapter, and the notes about it.

    Shapes (``(m, n)``, layout and conv kernel) must agree across the adapters that have a module.
    """
    union: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, ad in enumerate(adapters):
        for m in ad.modules:
            union.setdefault(m.name, []).append((i, m))
    for name, entries in union.items():
        first = entries[0][1]
        for i, m in entries[1:]:
            if (m.shape, m.layout, m.kernel) != (first.shape, first.layout, first.kernel):
                raise ShapeError(
                    f"module '{name}': {adapters[entries[0][0]].path} has ΔW {first.shape} ({first.layout}) but "
                    f"{adapters[i].path} has {m.shape} ({m.layout}); expected adapters of the same base model.")
    notes = []
    partial = [n for n, e in union.items() if len(e) < len(adapters)]
    if partial:
        notes.append(f"{len(partial)} of {len(union)} module(s) are missing from some adapters (e.g. '{partial[0]}'); "
                     "each is merged from the adapters that have it (the union of module sets, as PEFT does).")
    return union, notes


def _cat_factors(entries: list[tuple[int, LoraModule]], weights: Sequence[float],
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = [wᵢ sᵢ Bᵢ …] (m, Σrᵢ)``, ``A = [Aᵢ; …] (Σrᵢ, n)`` in ``dtype``.

    Each ``Bᵢ`` is scaled in the wider of its dtype and ``dtype`` (float32 at least) and rounded once
    to ``dtype``: no float64 copy of the whole stack.
    """
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(torch.promote_types(t.dtype, dtype), torch.float32))

    B = torch.cat([(wide(m.B) * (float(weights[i]) * m.scaling)).to(dtype) for i, m in entries], dim=1)
    A = torch.cat([m.A.to(dtype) for _, m in entries], dim=0)
    return B, A


def _out_dtype(adapters: Sequence[Adapter]) -> torch.dtype:
    """The inputs' factor dtype when they all share one, else float32."""
    dtypes = {m.dtype for ad in adapters for m in ad.modules}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _plain(first: LoraModule, A: torch.Tensor, B: torch.Tensor) -> LoraModule:
    """A scale-1 LoRA module in ``first``'s place (``alpha = r``)."""
    return replace(first, A=A, B=B, alpha=float(A.shape[0]), scaling=1.0, kind="lora")


# -- PEFT's entry-wise anchors (peft.utils.merge_utils), on a stack (N, *shape) of task tensors ---------------

def prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT's ``magnitude_based_pruning``: keep the ``int(density·numel)`` largest |entries| (``density ≥ 1``: all)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def prune_random(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``random_pruning(rescale=True)``: a Bernoulli(``density``) mask, survivors divided by ``density``.

    The mask is drawn in float32 (what PEFT draws for float32 factors), whatever the compute dtype, so
    it is the same draw in float32 and float64. ``density ≥ 1`` draws nothing, as PEFT.
    """
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full(t.shape, density, dtype=torch.float32), generator=generator)
    return t * mask.to(t.dtype) / density


def elect_and_merge(T: torch.Tensor, w: torch.Tensor, sign_method: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean (PEFT's ``calculate_majority_sign_mask`` + ``disjoint_merge``).

    ``T (N, …)`` pruned task tensors, ``w (N,)``. The sign is elected on the *unweighted* ``T``
    (``total``: sign of ``Σ T``; ``frequency``: of ``Σ sign T``, ties → +); the result is
    ``Σ wᵢ Tᵢ [sign Tᵢ = elected] / max(1, #{i : sign Tᵢ = elected})``.
    """
    sign = T.sign()
    mag = T.sum(0) if sign_method == "total" else sign.sum(0)
    mask = sign == torch.where(mag >= 0, 1, -1).to(sign.dtype)
    wT = T * w.reshape(-1, *([1] * (T.dim() - 1)))
    return (wT * mask).sum(0) / mask.sum(0).clamp(min=1)


def anchor_merge(deltas: list[torch.Tensor], w: torch.Tensor, method: str, density: float, sign_method: str,
                 generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``ties`` / ``dare_linear`` / ``dare_ties`` / ``magnitude_prune`` on dense task tensors."""
    if method in ("dare_linear", "dare_ties"):
        T = torch.stack([prune_random(d, density, generator) for d in deltas])
    else:
        T = torch.stack([prune_magnitude(d, density) for d in deltas])
    if method in ("ties", "dare_ties"):
        return elect_and_merge(T, w, sign_method)
    return (T * w.reshape(-1, *([1] * (T.dim() - 1)))).sum(0)


def merge_adapters(
    adapters: Sequence[Adapter],
    weights: Sequence[float],
    *,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: str = "total",
    compute: Compute | None = None,
    **options,
) -> Merged:
    """Merge ``adapters`` with ``weights`` (see the module docstring); nothing written.

    Returns a new :class:`Adapter` of scale-1 LoRA modules in the inputs' dtype (float32 when they
    differ) and per module: ``adapters`` (how many have it), ``rank_after`` and, except for ``cat``
    (exact), ``energy_kept`` / ``fro_error`` / ``fro_error_rel`` of the rank-``R`` cut against the
    merged update it approximates (``Σ wᵢΔWᵢ`` for svd, the pruned combination for the others).
    """
    adapters = list(adapters)
    weights = [float(w) for w in weights]
    check_merge_options(len(adapters), weights, method, rank, density, majority_sign_method)
    for ad in adapters:
        refuse_dora(ad, "merge")
    union, notes = module_union(adapters)
    cx = as_compute(compute, **options)
    out_dtype = _out_dtype(adapters)
    R = int(rank) if rank is not None else max(m.rank for ad in adapters for m in ad.modules)
    modules: dict[str, LoraModule] = {}
    records: dict[str, dict] = {}
    if method in ("cat", "svd"):
        cat = {}
        for name, entries in union.items():  # the svd is the cat adapter's SVD: factors in the compute dtype
            B, A = _cat_factors(entries, weights, out_dtype if method == "cat" else cx.dtype)
            cat[name] = _plain(entries[0][1], A, B)
        if method == "cat":
            modules = cat
            records = {n: {"module": n, "adapters": len(union[n]), "rank_after": m.rank} for n, m in cat.items()}
        else:
            cancelled = []
            for name, (S, Bf, Af) in folded(list(cat.values()), cx).items():
                k = min(R, S.numel())
                B, A = fold_factors(Bf, Af, k, 1.0, out_dtype)
                modules[name] = _plain(union[name][0][1], A, B)
                records[name] = {"module": name, "adapters": len(union[name]), "rank_after": k,
                                 **truncation_record(S, k)}
                # ‖Σ wᵢΔWᵢ‖_F against ‖B_cat‖_F ‖A_cat‖_F (≥ it): a ratio at rounding level means the weighted
                # updates cancel, and the "spectrum" above is round-off, not an update
                size = float(cat[name].B.double().norm() * cat[name].A.double().norm())
                if size > 0 and float(S.double().norm()) <= CANCELLED * size:
                    cancelled.append(name)
            if cancelled:
                notes.append(f"{len(cancelled)} module(s) (e.g. '{cancelled[0]}') merge to zero up to rounding: the "
                             "weighted updates cancel, so their factors and errors are round-off.")
    else:
        for done, (name, entries) in enumerate(union.items()):
            first = entries[0][1]
            # PEFT's get_delta_weight: ΔW in the base weight's stored layout (what the masks are drawn over)
            # (on the CPU: the masks come from a CPU generator, and the dense work is entry-wise)
            deltas = [m.delta(cx.dtype, base_layout=True) for _, m in entries]
            w = torch.tensor([weights[i] for i, _ in entries], dtype=cx.dtype)
            gen = torch.Generator().manual_seed(item_seed(seed, name))
            M = anchor_merge(deltas, w, method, float(density), majority_sign_method, gen)
            if first.layout in ("conv1d", "embedding"):
                M = M.T
            total = float(M.double().pow(2).sum())
            k = min(R, *M.shape)
            sp = decompose_matrices({name: M.contiguous()}, k=k, n_iter="auto", compute=replace(cx, progress=None))[name]
            B, A = fold_factors(*split_spectrum(sp, 1.0), k, 1.0, out_dtype)
            modules[name] = _plain(first, A, B)
            kept = float(sp.S.double().pow(2).sum())
            dropped = max(total - kept, 0.0)
            records[name] = {"module": name, "adapters": len(entries), "rank_after": k,
                             "energy_kept": kept / total if total > 0 else 1.0, "fro_error": dropped ** 0.5,
                             "fro_error_rel": (dropped / total) ** 0.5 if total > 0 else 0.0,
                             "svd": sp.method, "subspace_error": sp.error}
            cx.report(done + 1, len(union), name)
    for ad in adapters:
        notes += kind_note(ad)
        if ad.other_tensors:
            notes.append(f"{ad.path}: {len(ad.other_tensors)} tensor(s) that are not LoRA factors "
                         "(modules_to_save copies, …) are not merged and not written.")
    formats = {result_format(ad.format) for ad in adapters}
    if len(formats) > 1:
        notes.append(f"the adapters are of different formats ({', '.join(sorted(formats))}); the result takes the "
                     f"first one's ({result_format(adapters[0].format)}) module names.")
    names = sorted(modules, key=lambda n: modules[n].key.sort_key())
    mods = [modules[n] for n in names]
    params = {"method": method, "weights": weights, "rank": None if method == "cat" else R, "density": density,
              "seed": seed, "majority_sign_method": majority_sign_method}
    first = adapters[0]
    settings = replace(result_settings(mods, first.settings), use_rslora=False, modules_to_save=(),
                       raw={k: v for k, v in first.settings.raw.items() if k in ("task_type",)})
    out = replace(first, modules=tuple(mods), settings=settings, other_tensors=(), flags=(),
                  format=result_format(first.format), weights_file=None, adapter_name=None,
                  metadata=provenance("merge", params, [ad.path for ad in adapters]))
    check_finite(out, f"merge --method {method}")
    return Merged(out, tuple(records[n] for n in names), tuple(notes))


def merge(
    sources: Sequence[Adapter | str | Path],
    out: str | Path,
    *,
    weights: Sequence[float] | None = None,
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
    majority_sign_method: str = "total",
    to: str | None = None,
    overwrite: bool = False,
    format: str | None = None,
    compute: Compute | None = None,
    **options,
) -> MergeResult:
    """Read adapters of any format, merge them (:func:`merge_adapters`), write the result.

    ``weights`` default to 1 each (the plain sum); ``to`` defaults to the first adapter's format.
    """
    weights = [1.0] * len(sources) if weights is None else list(weights)
    check_merge_options(len(sources), weights, method, rank, density, majority_sign_method)
    check_target(to)
    adapters = [s if isinstance(s, Adapter) else load_adapter(s, format=format) for s in sources]
    res = merge_adapters(adapters, weights, method=method, rank=rank, density=density, seed=seed,
                         majority_sign_method=majority_sign_method, compute=compute, **options)
    target = to or default_target(adapters[0].format)
    written = write_result(res.adapter, out, target, overwrite=overwrite)
    recs = res.records
    summary = {"modules": len(recs), "adapters": len(adapters), "method": method, "weights": weights,
               "rank": None if method == "cat" else (rank or max(m.rank for ad in adapters for m in ad)),
               "parameters": res.adapter.num_parameters}
    if method != "cat":
        summary["energy_kept_min"] = min(r["energy_kept"] for r in recs)
        summary["fro_error_rel_max"] = max(r["fro_error_rel"] for r in recs)
    return MergeResult(Path(out), tuple(written), target, recs, summary, tuple(res.notes))
