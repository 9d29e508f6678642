"""Batched, device-aware decomposition of adapters and base weights.

Same-shaped matrices are stacked ``(L, m, n)`` (or their factors ``(L, m, r)``
and ``(L, r, n)``) and decomposed in one call per group, on the chosen device,
in chunks that respect a memory budget (:func:`lora_lens.chunks.chunks`;
settings in one :class:`~lora_lens.compute.Compute`). Results come back on the CPU as
:class:`Spectrum` values keyed by module name, in PyTorch's ``(m, n)`` layout
(a Conv1D adapter's ``U``/``Vh`` describe ``ΔW``, whose transpose is what the
Conv1D stores).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch

from .chunks import TRANSPOSED, chunk_size, chunks, load_w0, stack, stacked_chunks
from .compute import DTYPES, Compute, Progress, as_compute, resolve_device, resolve_dtype
from .errors import NonFiniteError
from .io.base import BaseWeights
from .linalg import factored_svd, factored_svd_folded, factored_svdvals, randomized_svd, svd, top_subspace_svd
from .randomized import HALF_PASS_DTYPES, half_passes_apply
from .types import Adapter, LayerKey, LoraModule

#: Re-exported for callers that import them from here.
__all__ = ["Compute", "DTYPES", "Progress", "Spectrum", "TopK", "adapter_singular_values", "chunk_size",
           "decompose_adapter", "decompose_base", "fold_adapter", "decompose_matrices", "resolve_device", "resolve_dtype"]


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Top singular triplets of one matrix: ``M ≈ U diag(S) Vh``.

    ``U (m, k)``, ``S (k,)`` descending, ``Vh (k, n)``; signs fixed. ``kind`` is
    ``delta`` (a LoRA update, exact with ``k = r``), ``base`` (a base weight,
    exact or randomized top-k) or ``matrix``. ``method``: ``svd`` (full SVD),
    ``randomized`` (fixed power iterations: accuracy unknown, ``error`` None) or
    ``iterated`` (:func:`~lora_lens.linalg.top_subspace_svd`); ``error``: the
    estimated ``1 − φ`` of ``U`` against the exact top-k subspace (0 for ``svd``).
    A ``randomized`` top-k also records its ``passes`` over the matrix and
    ``sv_error``, a bound on ``max_i |σ_i − S_i| / σ_i`` that holds whatever the
    spectrum (:attr:`~lora_lens.randomized.LowRankSVD.sv_bound`, from the residuals
    and ``‖W‖_F``: tight on low-rank-plus-noise and steep spectra, close to 1 on
    slowly decaying or flat ones, where nothing is certified; ``inf``: no bound);
    both 0 otherwise.
    """

    name: str
    key: LayerKey
    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    kind: str = "delta"
    exact: bool = True
    method: str = "svd"
    error: float | None = 0.0
    passes: int = 0
    sv_error: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    @property
    def k(self) -> int:
        return int(self.S.shape[0])


def _adapter_chunks(
    modules: Sequence[LoraModule], cx: Compute, buffers: int
) -> Iterator[tuple[list[LoraModule], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stacked factors of same-``(m, n, r)`` modules, one memory-bounded chunk at a time.

    Yields ``(chunk, B (L, m, r), A (L, r, n), s (L,))`` on the device in the
    compute dtype. ``buffers`` counts the ``(m + n) r`` buffers one item needs
    on the device (factors, QR copies, outputs).
    """
    for _, chunk in chunks(modules, lambda g: (g.shape, g.rank),
                           lambda key: buffers * (key[0][0] + key[0][1]) * key[1] * cx.itemsize, cx,
                           lambda key: f"{key[0][0]}x{key[0][1]} r={key[1]}"):
        B = stack(cx, chunk, lambda g: g.B)  # (L, m, r)
        A = stack(cx, chunk, lambda g: g.A)  # (L, r, n)
        s = torch.tensor([g.scaling for g in chunk], dtype=cx.dtype, device=cx.device)  # (L,)
        yield chunk, B, A, s


def _check_finite(chunk: list[LoraModule], B: torch.Tensor, A: torch.Tensor, S: torch.Tensor | None) -> None:
    """Refuse a chunk with NaN/Inf, naming every module and factor at fault.

    On the happy path only ``S (L, k)`` is scanned (tiny); the factors are
    searched only to word the error. ``S=None`` (the LAPACK call refused
    non-finite input) scans every module's factors and returns if all are
    finite, so the caller re-raises the original error.
    """
    if S is not None and bool(torch.isfinite(S).all()):
        return
    bad = []
    for i, g in enumerate(chunk):
        if S is not None and bool(torch.isfinite(S[i]).all()):
            continue
        parts = [f for f, t in (("lora_A", A[i]), ("lora_B", B[i])) if not bool(torch.isfinite(t).all())]
        if parts:
            bad.append(f"'{g.name}' ({' and '.join(parts)} hold NaN/Inf)")
        elif S is not None:
            bad.append(f"'{g.name}' (ΔW overflows {str(A.dtype).replace('torch.', '')})")
    if not bad:
        return
    overflow = all("overflows" in b for b in bad)
    raise NonFiniteError(
        f"{len(bad)} LoRA module(s) have non-finite singular values: {'; '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; "
        + ("expected finite updates: use --dtype float64." if overflow else
           "expected finite factors: the adapter is damaged or training diverged; use an earlier checkpoint.")
    )


def _map_chunks(
    modules: list[LoraModule], cx: Compute, kernel: Callable[..., tuple[torch.Tensor, ...]], s_pos: int, buffers: int,
) -> Iterator[tuple[list[LoraModule], tuple[torch.Tensor, ...]]]:
    """Run ``kernel(B, A, s)`` on every chunk; yield ``(chunk, outputs on the CPU)``.

    ``outputs[s_pos]`` are the singular values ``(L, k)``, checked for NaN/Inf.
    ``buffers``: how many ``(m + n) r`` buffers one item needs on the device.
    """
    for chunk, B, A, s in _adapter_chunks(modules, cx, buffers):
        try:
            outs = kernel(B, A, s)
        except torch.linalg.LinAlgError:  # LAPACK refuses NaN/Inf on the CPU; CUDA returns NaN instead
            _check_finite(chunk, B, A, None)
            raise
        _check_finite(chunk, B, A, outs[s_pos])
        yield chunk, tuple(o.cpu() for o in outs)


def decompose_adapter(
    adapter: Adapter | Sequence[LoraModule], *, compute: Compute | None = None, **options
) -> dict[str, Spectrum]:
    """Exact SVD of every module's ``ΔW = s·B A`` without forming it.

    One batched :func:`~lora_lens.linalg.factored_svd` per group of same
    ``(m, n, r)``; ``compute.max_memory`` (bytes) caps the factors and
    workspaces of one chunk on the device (``options``: :class:`Compute`'s
    fields as keywords). Returns ``{module name: Spectrum}`` (``k = r``, or
    ``min(r, m, n)`` when the rank exceeds a side) in the adapter's order.
    Non-finite factors raise :class:`NonFiniteError` naming the modules.
    """
    cx = as_compute(compute, **options)
    modules = list(adapter)
    out: dict[str, Spectrum] = {}
    # 3 buffers per item: factors, Q factors, U/Vh
    for chunk, (U, S, Vh) in _map_chunks(modules, cx, factored_svd, 1, 3):
        for i, g in enumerate(chunk):
            out[g.name] = Spectrum(g.name, g.key, U[i], S[i], Vh[i], kind="delta", exact=True)
    return {m.name: out[m.name] for m in modules}


def adapter_singular_values(
    adapter: Adapter | Sequence[LoraModule], *, compute: Compute | None = None, **options
) -> dict[str, torch.Tensor]:
    """Singular values of every module's ``ΔW = s·B A``: ``{name: S (k,)}`` descending, on the CPU.

    The values-only twin of :func:`decompose_adapter` (same grouping, chunks
    and checks) through :func:`~lora_lens.linalg.factored_svdvals`: no ``U``
    or ``Vh`` is formed, which is all spectra need. ``k = min(r, m, n)``.
    The values of one chunk are views of one ``(L, k)`` tensor.
    """
    cx = as_compute(compute, **options)
    modules = list(adapter)
    out: dict[str, torch.Tensor] = {}
    # 2 buffers per item: factors, QR copies
    for chunk, (S,) in _map_chunks(modules, cx, lambda B, A, s: (factored_svdvals(B, A, s),), 0, 2):
        for i, g in enumerate(chunk):
            out[g.name] = S[i]
    return {m.name: out[m.name] for m in modules}


def fold_adapter(
    adapter: Adapter | Sequence[LoraModule], *, compute: Compute | None = None, **options
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """Every module's spectrum folded into factors: ``{name: (S (k,), Bf (m, k), Af (k, n), cond)}``.

    :func:`~lora_lens.linalg.factored_svd_folded` through the same grouping, chunks and
    NaN checks as :func:`decompose_adapter`: ``s·Bf Af = s·B A`` with ``(σᵢ/|s|)^½`` in
    column / row ``i``, so the first ``k`` of each, at the module's scale ``s``, are the
    best rank-``k`` approximation (a zero ``s`` gives zero factors).
    ``cond`` is the factors' condition number (the folded factors' relative error
    is about ``eps · cond``); a module whose rank exceeds a side gets ``cond = inf``
    and its factors from :func:`decompose_adapter`.
    """
    cx = as_compute(compute, **options)
    modules = list(adapter)
    out: dict[str, tuple] = {}
    small = [g for g in modules if g.rank <= min(g.shape)]
    # 3 buffers per item: factors, folded factors, the QR workspace
    for chunk, (S, Bf, Af, cond) in _map_chunks(small, cx, factored_svd_folded, 0, 3):
        for i, g in enumerate(chunk):
            out[g.name] = (S[i], Bf[i], Af[i], float(cond[i]))
    wide = {g.name: g for g in modules if g.rank > min(g.shape)}
    for name, sp in (decompose_adapter(list(wide.values()), compute=cx).items() if wide else ()):
        out[name] = (sp.S, *split_spectrum(sp, wide[name].scaling), float("inf"))
    return {m.name: out[m.name] for m in modules}


def split_spectrum(sp: Spectrum, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``U (S/|s|)^½`` and ``sign(s) (S/|s|)^½ Vh``: the folded factors of an exact spectrum at scale ``s``."""
    if scaling == 0:
        return torch.zeros_like(sp.U), torch.zeros_like(sp.Vh)
    root = (sp.S.clamp_min(0) / abs(scaling)).sqrt()
    return sp.U * root, (1.0 if scaling > 0 else -1.0) * root[:, None] * sp.Vh


@dataclass(frozen=True)
class TopK:
    """How many directions a full-matrix SVD keeps, and how they are found.

    ``k=None``: the exact thin SVD (``k = min(m, n)``). With ``k``: the top-k,
    by the randomized range finder with ``n_iter`` power iterations when
    ``randomized`` (``None``: when ``k + oversample < min(m, n) / 2``), else the
    truncated exact SVD. ``n_iter="auto"``: subspaces accurate enough to compare
    (:func:`~lora_lens.linalg.top_subspace_svd`), ``randomized`` ignored.
    """

    k: int | None = None
    randomized: bool | None = None
    oversample: int = 16
    n_iter: int | str = 4

    def for_shape(self, m: int, n: int) -> tuple[int, str]:
        """``(kept directions, how)`` for an ``(m, n)`` matrix; ``how``: ``svd``, ``randomized`` or ``auto``."""
        kk = min(m, n) if self.k is None else min(self.k, m, n)
        if self.n_iter == "auto":
            return kk, "auto"
        rand = self.randomized if self.randomized is not None else \
            (self.k is not None and kk + self.oversample < min(m, n) / 2)
        return kk, "randomized" if rand else "svd"


def decompose_matrices(
    matrices: "OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor]",
    *,
    k: int | None = None,
    keys: dict[str, LayerKey] | None = None,
    randomized: bool | None = None,
    oversample: int = 16,
    n_iter: int | str = 4,
    kind: str = "matrix",
    compute: Compute | None = None,
    **options,
) -> dict[str, Spectrum]:
    """SVD of full matrices ``(m, n)``, batched by shape (see :class:`TopK` for ``k``/``randomized``).

    Each matrix's random sketch is seeded from its name and ``compute.seed``,
    so its result does not depend on ``max_memory`` or on the other matrices.
    """
    return _decompose_named(list(matrices), lambda n: tuple(matrices[n].shape), lambda n: matrices[n], keys or {},
                            kind, TopK(k, randomized, oversample, n_iter), as_compute(compute, **options),
                            stored=lambda n: str(matrices[n].dtype).removeprefix("torch."))


def decompose_base(
    base: BaseWeights,
    weight_names: Sequence[str],
    *,
    k: int | None = None,
    layouts: Mapping[str, str] | None = None,
    randomized: bool | None = None,
    oversample: int = 16,
    n_iter: int | str = 4,
    prefetch: bool = True,
    compute: Compute | None = None,
    **options,
) -> dict[str, Spectrum]:
    """Top-k (or full) SVD of base weights, read lazily one shape group (chunk) at a time.

    Peak memory is one chunk of one shape group (plus, with ``prefetch``, the
    next chunk's input, read on a background thread while this one is
    decomposed; the budget counts it either way, so ``prefetch`` changes no
    number), never the checkpoint.
    ``layouts``: ``{weight name: layout}`` for weights not stored ``(m, n)``
    (``conv1d``, ``embedding``: stored ``(n, m)``; see
    :func:`~lora_lens.chunks.load_w0`); they are decomposed in PyTorch's
    ``(m, n)`` layout so they line up with adapter spectra. Keys of the result
    are the weight names. ``n_iter="auto"``: subspaces accurate enough to
    compare (:func:`~lora_lens.linalg.top_subspace_svd`: a full SVD for small
    matrices, else iterations until a measured error bound; ``randomized`` is
    then ignored). Random sketches are seeded per weight name.
    """
    layouts = dict(layouts or {})
    shapes = {}
    for w in weight_names:
        stored = tuple(base.info(w).shape)
        if layouts.get(w) in TRANSPOSED:
            shapes[w] = stored[::-1]
        elif len(stored) > 2:
            shapes[w] = (stored[0], math.prod(stored[1:]))
        else:
            shapes[w] = stored
    keys = {w: base.layer_key(w) for w in weight_names}
    return _decompose_named(list(weight_names), shapes.__getitem__, lambda w: load_w0(base, w, layouts.get(w, "linear")),
                            keys, "base", TopK(k, randomized, oversample, n_iter), as_compute(compute, **options),
                            prefetch, lambda w: base.info(w).dtype)


def _decompose_named(names: list[str], shape: Callable[[str], tuple[int, int]], load: Callable[[str], torch.Tensor],
                     keys: dict[str, LayerKey], kind: str, top: TopK, cx: Compute,
                     prefetch: bool = False, stored: Callable[[str], str] | None = None) -> dict[str, Spectrum]:
    """SVD of named ``(m, n)`` matrices, one chunk of one shape at a time; results on the CPU.

    ``prefetch``: stack the next chunk on a background thread (:func:`~lora_lens.chunks.stacked_chunks`).
    ``stored``: each name's stored dtype (``"bfloat16"``, …): a shape group stored entirely in bf16 is
    stacked as stored for the range finder's half passes. A whole group or none, so the budget never
    decides which weights get them (a chunk mixing dtypes would be upcast).
    """
    out: dict[str, Spectrum] = {}
    all_bf16: dict[tuple[int, int], bool] = {}
    for name in names if stored is not None else ():
        all_bf16[shape(name)] = all_bf16.get(shape(name), True) and stored(name) == "bfloat16"

    def per_item(mn: tuple[int, int]) -> int:  # input, the next chunk's input, workspace, factors
        m, n = mn
        return (4 * m * n + (m + n) * min(m, n)) * cx.itemsize

    def keep(mn: tuple[int, int]) -> tuple[torch.dtype, ...]:  # bf16 stacked as stored where half passes read it
        if not all_bf16.get(mn) or top.for_shape(*mn)[1] != "randomized" or cx.half_passes is False \
                or cx.dtype != torch.float32:
            return ()
        return HALF_PASS_DTYPES if cx.half_passes or half_passes_apply(torch.bfloat16, cx.dtype, cx.device) else ()

    for (m, n), chunk, W in stacked_chunks(names, shape, per_item, cx, load, lambda mn: f"{mn[0]}x{mn[1]}", prefetch,
                                           keep):
        kk, how = top.for_shape(m, n)
        seeds = cx.seeds_for(chunk)  # one sketch per matrix: its numbers do not depend on the chunk
        passes, sv_error = torch.zeros(len(chunk), dtype=torch.long), torch.zeros(len(chunk))
        if how == "auto":
            U, S, Vh, acc = top_subspace_svd(W, kk, oversample=top.oversample, seed=seeds)
        elif how == "randomized":
            # keep() decided: the stack is bf16 exactly where half passes are to run
            res = randomized_svd(W, kk, oversample=top.oversample, n_iter=top.n_iter, seed=seeds, dtype=cx.dtype,
                                 half_passes=W.dtype in HALF_PASS_DTYPES)
            (U, S, Vh), passes, sv_error = res, res.passes, res.sv_bound
        else:
            U, S, Vh = svd(W)
            U, S, Vh = U[..., :kk], S[..., :kk], Vh[..., :kk, :]
        U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
        del W
        for i, name in enumerate(chunk):
            key = keys.get(name) or LayerKey("", None, name)
            if how == "auto":
                exact = bool(acc.exact[i])
                info = dict(exact=exact, method="svd" if exact else "iterated", error=float(acc.error[i]))
            else:
                info = dict(exact=how == "svd", method=how, error=None if how == "randomized" else 0.0)
            out[name] = Spectrum(name, key, U[i], S[i], Vh[i], kind=kind, **info, passes=int(passes[i]),
                                 sv_error=float(sv_error[i]))
    return {n: out[n] for n in names}
