"""Batched, device-aware decomposition of adapters and base weights.

Same-shaped matrices are stacked ``(L, m, n)`` (or their factors ``(L, m, r)``
and ``(L, r, n)``) and decomposed in one call per group, on the chosen device,
in chunks that respect a memory budget. Results come back on the CPU as
:class:`Spectrum` values keyed by module name, in PyTorch's ``(m, n)`` layout
(a Conv1D adapter's ``U``/``Vh`` describe ``ΔW``, whose transpose is what the
Conv1D stores).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from .errors import ConfigError, NonFiniteError
from .io.base import BaseWeights
from .linalg import factored_svd, factored_svdvals, randomized_svd, svd, top_subspace_svd
from .types import Adapter, LayerKey, LoraModule

#: ``progress(done, total, what)`` is called after each chunk.
Progress = Callable[[int, int, str], None]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Top singular triplets of one matrix: ``M ≈ U diag(S) Vh``.

    ``U (m, k)``, ``S (k,)`` descending, ``Vh (k, n)``; signs fixed. ``kind`` is
    ``delta`` (a LoRA update, exact with ``k = r``), ``base`` (a base weight,
    exact or randomized top-k) or ``matrix``. ``method``: ``svd`` (full SVD),
    ``randomized`` (fixed power iterations: accuracy unknown, ``error`` None) or
    ``iterated`` (:func:`~lora_lens.linalg.top_subspace_svd`); ``error``: the
    estimated ``1 − φ`` of ``U`` against the exact top-k subspace (0 for ``svd``).
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

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.U.shape[0]), int(self.Vh.shape[1])

    @property
    def k(self) -> int:
        return int(self.S.shape[0])


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is refused."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available; use --device cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda[:N].") from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"unknown compute dtype {dtype!r}; expected one of {list(DTYPES)}.") from None


def chunk_size(per_item_bytes: int, max_memory: int | None, total: int) -> int:
    """How many items fit a memory budget (at least one)."""
    if not max_memory:
        return max(total, 1)
    return max(1, min(total, max_memory // max(per_item_bytes, 1)))


def _group_by_shape(modules: Iterable[LoraModule]) -> "OrderedDict[tuple, list[LoraModule]]":
    groups: OrderedDict[tuple, list[LoraModule]] = OrderedDict()
    for m in modules:
        groups.setdefault((m.shape, m.rank), []).append(m)
    return groups


def _adapter_chunks(
    modules: Sequence[LoraModule], dev: torch.device, dt: torch.dtype, max_memory: int | None, buffers: int
) -> Iterator[tuple[list[LoraModule], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stacked factors of same-``(m, n, r)`` modules, one memory-bounded chunk at a time.

    Yields ``(chunk, B (L, m, r), A (L, r, n), s (L,))`` on ``dev`` in ``dt``.
    ``buffers`` counts the ``(m + n) r`` buffers one item needs on the device
    (factors, QR copies, outputs).
    """
    itemsize = torch.finfo(dt).bits // 8
    for ((m, n), r), group in _group_by_shape(modules).items():
        step = chunk_size(buffers * (m + n) * r * itemsize, max_memory, len(group))
        for lo in range(0, len(group), step):
            chunk = group[lo: lo + step]
            B = torch.stack([g.B for g in chunk]).to(dev, dt)  # (L, m, r)
            A = torch.stack([g.A for g in chunk]).to(dev, dt)  # (L, r, n)
            s = torch.tensor([g.scaling for g in chunk], dtype=dt, device=dev)  # (L,)
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
    modules: list[LoraModule], device, dtype, max_memory: int | None, progress: Progress | None,
    kernel: Callable[..., tuple[torch.Tensor, ...]], s_pos: int, buffers: int,
) -> Iterator[tuple[list[LoraModule], tuple[torch.Tensor, ...]]]:
    """Run ``kernel(B, A, s)`` on every chunk; yield ``(chunk, outputs on the CPU)``.

    ``outputs[s_pos]`` are the singular values ``(L, k)``, checked for NaN/Inf.
    ``buffers``: how many ``(m + n) r`` buffers one item needs on the device.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    done = 0
    for chunk, B, A, s in _adapter_chunks(modules, dev, dt, max_memory, buffers):
        try:
            outs = kernel(B, A, s)
        except torch.linalg.LinAlgError:  # LAPACK refuses NaN/Inf on the CPU; CUDA returns NaN instead
            _check_finite(chunk, B, A, None)
            raise
        _check_finite(chunk, B, A, outs[s_pos])
        yield chunk, tuple(o.cpu() for o in outs)
        done += len(chunk)
        if progress:
            progress(done, len(modules), f"{B.shape[1]}x{A.shape[2]} r={A.shape[1]}")


def decompose_adapter(
    adapter: Adapter | Sequence[LoraModule],
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Spectrum]:
    """Exact SVD of every module's ``ΔW = s·B A`` without forming it.

    One batched :func:`~lora_lens.linalg.factored_svd` per group of same
    ``(m, n, r)``; ``max_memory`` (bytes) caps the factors and workspaces of
    one chunk on the device. Returns ``{module name: Spectrum}`` (``k = r``, or
    ``min(r, m, n)`` when the rank exceeds a side) in the adapter's order.
    Non-finite factors raise :class:`NonFiniteError` naming the modules.
    """
    modules = list(adapter)
    out: dict[str, Spectrum] = {}
    # 3 buffers per item: factors, Q factors, U/Vh
    for chunk, (U, S, Vh) in _map_chunks(modules, device, dtype, max_memory, progress, factored_svd, 1, 3):
        for i, g in enumerate(chunk):
            out[g.name] = Spectrum(g.name, g.key, U[i], S[i], Vh[i], kind="delta", exact=True)
    return {m.name: out[m.name] for m in modules}


def adapter_singular_values(
    adapter: Adapter | Sequence[LoraModule],
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> dict[str, torch.Tensor]:
    """Singular values of every module's ``ΔW = s·B A``: ``{name: S (k,)}`` descending, on the CPU.

    The values-only twin of :func:`decompose_adapter` (same grouping, chunks
    and checks) through :func:`~lora_lens.linalg.factored_svdvals`: no ``U``
    or ``Vh`` is formed, which is all spectra need. ``k = min(r, m, n)``.
    The values of one chunk are views of one ``(L, k)`` tensor.
    """
    modules = list(adapter)
    out: dict[str, torch.Tensor] = {}
    # 2 buffers per item: factors, QR copies
    for chunk, (S,) in _map_chunks(modules, device, dtype, max_memory, progress,
                                   lambda B, A, s: (factored_svdvals(B, A, s),), 0, 2):
        for i, g in enumerate(chunk):
            out[g.name] = S[i]
    return {m.name: out[m.name] for m in modules}


def decompose_matrices(
    matrices: "OrderedDict[str, torch.Tensor] | dict[str, torch.Tensor]",
    k: int | None = None,
    keys: dict[str, LayerKey] | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
    max_memory: int | None = None,
    randomized: bool | None = None,
    oversample: int = 16,
    n_iter: int = 4,
    seed: int = 0,
    kind: str = "matrix",
    progress: Progress | None = None,
) -> dict[str, Spectrum]:
    """SVD of full matrices ``(m, n)``, batched by shape.

    ``k=None``: the exact thin SVD (``k = min(m, n)``). With ``k``: the top-k,
    by the randomized range finder when ``randomized`` (default: when
    ``k + oversample < min(m, n) / 2``), else truncated exact SVD.
    """
    names = list(matrices)
    groups: OrderedDict[tuple, list[str]] = OrderedDict()
    for name in names:
        groups.setdefault(tuple(matrices[name].shape), []).append(name)
    return _decompose_groups(
        groups, lambda ns: torch.stack([matrices[n] for n in ns]), k, keys or {}, device, dtype, max_memory,
        randomized, oversample, n_iter, seed, kind, progress,
    )


def decompose_base(
    base: BaseWeights,
    weight_names: Sequence[str],
    k: int | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = torch.float32,
    max_memory: int | None = None,
    randomized: bool | None = None,
    oversample: int = 16,
    n_iter: int | str = 4,
    seed: int = 0,
    transpose: Sequence[str] = (),
    progress: Progress | None = None,
) -> dict[str, Spectrum]:
    """Top-k (or full) SVD of base weights, read lazily one shape group (chunk) at a time.

    Peak memory is one chunk of one shape group, never the checkpoint.
    ``transpose``: names stored as ``(n, m)`` (Conv1D, Embedding), decomposed in
    PyTorch's ``(m, n)`` layout so they line up with adapter spectra. Keys of
    the result are the weight names. ``n_iter="auto"``: subspaces accurate enough
    to compare (:func:`~lora_lens.linalg.top_subspace_svd`: a full SVD for small
    matrices, else iterations until a measured error bound; ``randomized`` is then ignored).
    """
    infos = {w: base.info(w) for w in weight_names}
    tset = set(transpose)
    groups: OrderedDict[tuple, list[str]] = OrderedDict()
    for w in weight_names:
        shape = infos[w].shape[::-1] if w in tset else infos[w].shape
        groups.setdefault(tuple(shape), []).append(w)

    def load(ns: list[str]) -> torch.Tensor:
        return torch.stack([base.get(w).T if w in tset else base.get(w) for w in ns])

    keys = {w: base.layer_key(w) for w in weight_names}
    return _decompose_groups(groups, load, k, keys, device, dtype, max_memory, randomized, oversample, n_iter, seed,
                             "base", progress)


def _decompose_groups(groups, load, k, keys, device, dtype, max_memory, randomized, oversample, n_iter, seed, kind,
                      progress) -> dict[str, Spectrum]:
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    itemsize = torch.finfo(dt).bits // 8
    total = sum(len(v) for v in groups.values())
    out: dict[str, Spectrum] = {}
    done = 0
    for (m, n), names in groups.items():
        kk = min(m, n) if k is None else min(k, m, n)
        auto = n_iter == "auto"
        use_rand = not auto and (randomized if randomized is not None else
                                 (k is not None and kk + oversample < min(m, n) / 2))
        per_item = (3 * m * n + (m + n) * min(m, n)) * itemsize  # input, workspace, factors
        step = chunk_size(per_item, max_memory, len(names))
        for lo in range(0, len(names), step):
            chunk = names[lo: lo + step]
            W = load(chunk).to(dev, dt)  # (L, m, n)
            if auto:
                U, S, Vh, acc = top_subspace_svd(W, kk, oversample=oversample, seed=seed)
            elif use_rand:
                U, S, Vh = randomized_svd(W, kk, oversample=oversample, n_iter=n_iter, seed=seed)
            else:
                U, S, Vh = svd(W)
                U, S, Vh = U[..., :kk], S[..., :kk], Vh[..., :kk, :]
            U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
            for i, name in enumerate(chunk):
                key = keys.get(name) or LayerKey("", None, name)
                if auto:
                    how = dict(exact=acc.method == "svd", method=acc.method, error=float(acc.error[i]))
                else:
                    how = dict(exact=not use_rand, method="randomized" if use_rand else "svd",
                               error=None if use_rand else 0.0)
                out[name] = Spectrum(name, key, U[i], S[i], Vh[i], kind=kind, **how)
            done += len(chunk)
            if progress:
                progress(done, total, f"{m}x{n}")
            del W
    return out
