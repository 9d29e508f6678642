"""Extract a LoRA from a full fine-tune: the top singular pairs of ``ΔW = W_tuned − W_base`` per weight.

For every weight present in both checkpoints with the same shape — a Linear ``(m, n)``, a GPT-2
``Conv1D`` (stored ``(n, m)``, transposed), a Conv2d kernel flattened to ``(out, in·kh·kw)``, and with
``embeddings`` an Embedding (stored ``(num, dim)``) — in PyTorch's ``(m, n)`` layout::

    ΔW = W_tuned − W_base ≈ U_j diag(σ_1..σ_j) V_jᵀ,   B = U_j diag(√σ),  A = diag(√σ) V_jᵀ,  s = 1

(mergekit's split of ``√σ`` between the factors; ``alpha = r`` so PEFT's scaling is 1). The top
``q`` pairs come from the project's range finder (:func:`lora_lens.linalg.randomized_svd`, exact
SVD where ``q + oversample`` reaches ``min(m, n)``), run on one chunk of same-shaped differences at
a time: each ``ΔW`` is formed in the compute dtype from one stored pair (bf16/fp16 read as stored,
the subtraction upcasts), so peak memory is one chunk plus one weight pair, never the model.

Ranks: ``method="rank"`` keeps ``q = param``. The rules (:mod:`.rank_rules`) are applied to the top
``q = max_rank`` values (default :data:`DEFAULT_MAX_RANK`): ``sv_ratio`` needs only ``σ_1``;
``sv_fro`` and ``energy`` divide by the exact ``‖ΔW‖_F²`` (summed from the chunk in float64), so they
are exact up to the cap; ``sv_cumulative`` divides by ``Σσ`` of the computed top-q only (the full
nuclear norm is not known without a full SVD), so it keeps at most what a full spectrum would.

Per module: ``energy_kept = Σ_{i≤j} σ_i² / ‖ΔW‖_F²`` and the residual
``‖ΔW − ΔW_j‖_F = √(‖ΔW‖_F² − Σ_{i≤j} σ_i²)`` (exact for the orthonormal factors the finder
returns; its rounding floor is ``≈ √u ‖ΔW‖_F``, ``u`` the compute dtype's unit roundoff).

The unit of work is one chunk (:class:`ExtractTask`, picklable: paths, weight names, settings);
:func:`extract_task` reads the files itself, so it runs in-process or on Dask workers
(:func:`lora_lens.dist.dask_mapper`) with the same numbers: every sketch is seeded per weight name.

Tensors that are not extracted but changed (biases, norms, non-target weights) are copied from the
tuned checkpoint as PEFT ``modules_to_save`` (their whole module: PEFT replaces it by the copy),
unless their module is itself a LoRA target (PEFT's plain LoRA has no place for it: reported).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ..chunks import chunks, load_w0
from ..compute import Compute, Progress, as_compute
from ..errors import ConfigError, KeyMatchError, NonFiniteError, ShapeError
from ..io.base import BaseWeights, open_base
from ..io.layout import weight_layout
from ..jsonable import stamp
from ..keys import parse_module_path, resolve_targets
from ..linalg import randomized_svd
from ..types import LayerKey, LoraModule
from .rank_rules import check_rank_rule, select_rank

#: Directions computed per weight for the rank rules when ``max_rank`` is not given.
DEFAULT_MAX_RANK = 64

#: Module names (the last path part) read as ``nn.Embedding`` weights (stored ``(num, dim)``).
EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "position_embeddings", "token_type_embeddings", "wte", "wpe",
                   "embed_in", "embed_positions", "tok_embeddings", "token_embedding", "position_embedding", "shared")

#: ``mapper(fn, tasks)`` → results in task order (builtin ``map``, or Dask's, :mod:`lora_lens.dist`).
Mapper = Callable[[Callable, Sequence], Iterable]

_FLOATS = ("float16", "bfloat16", "float32", "float64", "F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class ExtractSettings:
    """How many directions each weight keeps and how they are found; shipped with every task.

    ``method``/``param``/``max_rank``: the rank rule (:mod:`.rank_rules`); ``oversample``/``n_iter``:
    the range finder's; ``compute``: device, dtype, chunk budget and seed (its progress is dropped:
    tasks travel to other processes).
    """

    method: str = "rank"
    param: float = 16
    max_rank: int | None = None
    oversample: int = 16
    n_iter: int = 4
    compute: Compute = field(default_factory=Compute)

    def __post_init__(self) -> None:
        check_rank_rule(self.method, self.param, self.max_rank)
        object.__setattr__(self, "compute", replace(self.compute, progress=None))

    @property
    def q(self) -> int:
        """Directions computed per weight (before ``min(m, n)``)."""
        if self.method == "rank":
            return int(self.param) if self.max_rank is None else min(int(self.param), int(self.max_rank))
        return int(self.max_rank or DEFAULT_MAX_RANK)


@dataclass(frozen=True)
class ExtractTask:
    """One chunk: same-``(m, n)`` weights of the two checkpoints, and how to decompose them."""

    base: str
    tuned: str
    weights: tuple[str, ...]
    layouts: tuple[str, ...]
    shape: tuple[int, int]
    settings: ExtractSettings

    @property
    def name(self) -> str:  # what Dask calls the task
        return self.weights[0] if len(self.weights) == 1 else f"{self.weights[0]} (+{len(self.weights) - 1})"


@dataclass(frozen=True, eq=False)
class ModuleExtract:
    """One extracted weight: ``ΔW ≈ B A`` (``B (m, r)``, ``A (r, n)``, PyTorch layout), and how well.

    ``norm`` = ``‖ΔW‖_F``; ``energy_kept`` and ``residual`` as in the module docstring; ``rank`` 0 and no
    factors for a weight that did not change; ``sigma``: the computed top-q singular values.
    """

    name: str
    weight: str
    key: LayerKey
    layout: str
    shape: tuple[int, int]
    kernel: tuple[int, ...]
    rank: int
    norm: float
    energy_kept: float
    residual: float
    sigma: tuple[float, ...]
    B: torch.Tensor | None = None
    A: torch.Tensor | None = None

    def to_dict(self) -> dict:
        # reshaped: factors left out (they are in the written adapter)
        return {"name": self.name, "weight": self.weight, "layout": self.layout, "shape": list(self.shape),
                "rank": self.rank, "norm": self.norm, "energy_kept": self.energy_kept, "residual": self.residual,
                "relative_residual": self.residual / self.norm if self.norm > 0 else 0.0, "sigma": list(self.sigma)}


@dataclass(frozen=True)
class Extraction:
    """:func:`extract_lora`'s result: per module ranks, energy and residual; what else was written."""

    base: str
    tuned: str
    out: str | None
    method: str
    param: float
    max_rank: int | None
    modules: tuple[ModuleExtract, ...]
    modules_to_save: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        # reshaped: only written (changed) modules listed; unchanged ones counted
        return stamp("extraction", {
            "base": self.base, "tuned": self.tuned, "out": self.out, "method": self.method, "param": self.param,
            "max_rank": self.max_rank, "modules_to_save": list(self.modules_to_save),
            "unchanged": len(self.unchanged), "notes": list(self.notes),
            "modules": [m.to_dict() for m in self.modules if m.rank > 0]})


# ------------------------------------------------------------------------------------------ planning


def _is_float(dtype: str) -> bool:
    return str(dtype).removeprefix("torch.") in _FLOATS


def _is_embedding(weight: str) -> bool:
    return weight.removesuffix(".weight").rsplit(".", 1)[-1] in EMBEDDING_NAMES


def check_same_architecture(base: BaseWeights, tuned: BaseWeights) -> None:
    """Refuse two checkpoints whose tensor names or shapes differ, naming the first key that does."""
    bn, tn = base.names(), tuned.names()
    bs, ts = set(bn), set(tn)
    for what, extra, src, other in (("missing from", [n for n in bn if n not in ts], base, tuned),
                                    ("missing from", [n for n in tn if n not in bs], tuned, base)):
        if extra:
            raise KeyMatchError(
                f"{other.path}: tensor '{extra[0]}' of {src.path} is {what} it ({len(extra)} such tensor(s)); "
                "expected the same architecture in --base and --tuned. Check that --tuned was fine-tuned from --base.")
    for n in bn:
        a, b = tuple(base.info(n).shape), tuple(tuned.info(n).shape)
        if a != b:
            raise ShapeError(f"{tuned.path}: tensor '{n}' is {'x'.join(map(str, b))} in --tuned and "
                             f"{'x'.join(map(str, a))} in --base; expected the same architecture. Check that "
                             "--tuned was fine-tuned from --base (an extended vocabulary is not supported).")


def candidate_layouts(base: BaseWeights, embeddings: bool) -> dict[str, str]:
    """``{weight: layout}`` of every tensor a LoRA can hold: 2-D ``*.weight`` (linear, conv1d, embedding with
    ``embeddings``) and 4-D Conv2d kernels (``conv``), in file order."""
    out = {}
    for info in base.infos():
        if not info.name.endswith(".weight") or not _is_float(info.dtype):
            continue
        if len(info.shape) == 2:
            if _is_embedding(info.name):
                if embeddings:
                    out[info.name] = "embedding"
            else:
                out[info.name] = weight_layout(base, info.name)
        elif len(info.shape) == 4:
            out[info.name] = "conv"
    return out


def select_targets(layouts: dict[str, str], targets: str | Sequence[str] | None, source: str) -> dict[str, str]:
    """The candidates whose module type a ``targets`` name selects (PEFT's suffix rule); all without ``targets``."""
    if targets is None:
        return dict(layouts)
    types = list(dict.fromkeys(parse_module_path(w.removesuffix(".weight")).module for w in layouts))
    chosen = set(resolve_targets(targets, types, source=source))
    return {w: lay for w, lay in layouts.items() if parse_module_path(w.removesuffix(".weight")).module in chosen}


def _mn(base: BaseWeights, weight: str, layout: str) -> tuple[int, int]:
    shape = tuple(base.info(weight).shape)
    if layout in ("conv1d", "embedding"):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def plan_extract(base: BaseWeights, tuned: BaseWeights, targets: dict[str, str],
                 settings: ExtractSettings) -> list[ExtractTask]:
    """One :class:`ExtractTask` per chunk of same-``(m, n)`` targets that fits ``settings.compute.max_memory``."""
    cx = settings.compute
    shapes = {w: _mn(base, w, lay) for w, lay in targets.items()}

    def per_item(mn):  # ΔW, the finder's Q/Z blocks and sketches, the factors it returns
        m, n = mn
        q = min(settings.q + settings.oversample, m, n)
        return (m * n + 4 * (m + n) * q) * cx.itemsize

    return [ExtractTask(str(base.path), str(tuned.path), tuple(run), tuple(targets[w] for w in run), key, settings)
            for key, run in chunks(list(targets), shapes.__getitem__, per_item, replace(cx, progress=None))]


# ------------------------------------------------------------------------------------------ the work


@lru_cache(maxsize=8)
def _opened(path: str) -> BaseWeights:
    """One lazily opened checkpoint per path and process (a worker runs many tasks on the same files)."""
    return open_base(path)


def _difference(base: BaseWeights, tuned: BaseWeights, task: ExtractTask, cx: Compute) -> torch.Tensor:
    """``ΔW (L, m, n)`` on the device in the compute dtype, one stored pair read at a time."""
    m, n = task.shape
    D = torch.empty(len(task.weights), m, n, dtype=cx.dtype, device=cx.device)
    for i, (w, lay) in enumerate(zip(task.weights, task.layouts)):
        D[i].copy_(load_w0(tuned, w, lay))
        Wb = load_w0(base, w, lay)
        D[i].sub_(Wb.to(cx.device))  # the stored dtype is upcast by the subtraction, no extra copy kept
        del Wb
    return D


def _squared_norms(D: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``‖ΔW_i‖_F²`` of a stack ``(L, m, n)`` in float64 on the CPU, ``rows`` rows at a time (a float32 entry's
    square is exact in float64; no float64 copy of the chunk is made)."""
    out = torch.zeros(D.shape[0], dtype=torch.float64)
    for i in range(D.shape[0]):
        for lo in range(0, D.shape[1], rows):
            out[i] += float(D[i, lo: lo + rows].to(torch.float64).pow(2).sum())
    return out


def extract_task(task: ExtractTask) -> list[ModuleExtract]:
    """Decompose one chunk's differences (reads the two checkpoints itself: runs on a Dask worker as well)."""
    st, cx = task.settings, task.settings.compute
    base, tuned = _opened(task.base), _opened(task.tuned)
    m, n = task.shape
    D = _difference(base, tuned, task, cx)
    norms2 = _squared_norms(D)
    q = min(st.q, m, n)
    U, S, Vh = randomized_svd(D, q, oversample=st.oversample, n_iter=st.n_iter, seed=cx.seeds_for(task.weights),
                              dtype=cx.dtype)
    del D
    U, S, Vh = U.cpu(), S.cpu(), Vh.cpu()
    if not bool(torch.isfinite(S).all()):
        bad = [w for i, w in enumerate(task.weights) if not bool(torch.isfinite(S[i]).all())]
        raise NonFiniteError(f"{task.tuned}: ΔW of '{bad[0]}' has non-finite singular values ({len(bad)} weight(s)); "
                             "expected finite weights in both checkpoints: use --dtype float64 or check the files.")
    out = []
    for i, (w, lay) in enumerate(zip(task.weights, task.layouts)):
        total = float(norms2[i])
        name = w.removesuffix(".weight")
        kernel = tuple(base.info(w).shape[2:]) if lay == "conv" else ()
        sig = S[i].to(torch.float64)
        if total <= 0:
            out.append(ModuleExtract(name, w, base.layer_key(w), lay, (m, n), kernel, 0, 0.0, 1.0, 0.0, ()))
            continue
        j = _rank(sig, total, st)
        kept = float((sig[:j] ** 2).sum())
        root = S[i, :j].clamp_min(0).sqrt()
        B = (U[i, :, :j] * root).contiguous()  # (m, j)
        A = (root[:, None] * Vh[i, :j]).contiguous()  # (j, n)
        out.append(ModuleExtract(name, w, base.layer_key(w), lay, (m, n), kernel, j, math.sqrt(total),
                                 min(kept / total, 1.0), math.sqrt(max(total - kept, 0.0)),
                                 tuple(float(x) for x in sig), B, A))
    return out


def _rank(sig: torch.Tensor, total: float, st: ExtractSettings) -> int:
    """The kept rank of one weight from its top-q values ``sig`` (float64) and its exact ``‖ΔW‖_F² = total``."""
    q = int(sig.numel())
    if st.method == "rank":
        return min(int(st.param), q)
    if st.method in ("sv_fro", "energy"):
        # the tail's energy as one last value: the rules' Σσ² is then the exact ‖ΔW‖_F², and a rank not reached
        # within the top q is capped at q
        tail = math.sqrt(max(total - float((sig ** 2).sum()), 0.0))
        return select_rank(torch.cat([sig, sig.new_tensor([tail])]), st.method, st.param, max_rank=q)
    return select_rank(sig, st.method, st.param, max_rank=q)


# ------------------------------------------------------------------------------------------ the whole run


def _changed_others(base: BaseWeights, tuned: BaseWeights, skip: set[str]) -> list[str]:
    """Floating tensors outside ``skip`` whose values differ (read one pair at a time)."""
    out = []
    for info in base.infos():
        if info.name in skip or not _is_float(info.dtype):
            continue
        a, b = base.get(info.name), tuned.get(info.name)
        if a.dtype != b.dtype:  # compared in the wider dtype (exact for bf16/fp16 → float32), not in float64
            dt = torch.promote_types(a.dtype, b.dtype)
            a, b = a.to(dt), b.to(dt)
        if not torch.equal(a, b):
            out.append(info.name)
        del a, b
    return out


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def extract_lora(
    base: str | Path | BaseWeights,
    tuned: str | Path | BaseWeights,
    out_dir: str | Path | None = None,
    *,
    rank: int | None = None,
    method: str | None = None,
    param: float | None = None,
    max_rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    embeddings: bool = False,
    modules_to_save: bool = True,
    oversample: int = 16,
    n_iter: int = 4,
    mapper: Mapper | None = None,
    overwrite: bool = False,
    compute: Compute | None = None,
    progress: Progress | None = None,
    **options,
) -> Extraction:
    """Extract a LoRA from ``tuned − base`` and write it as a PEFT folder at ``out_dir`` (None: compute only).

    Give ``rank`` (fixed) or ``method``/``param`` (a rank rule, :mod:`.rank_rules`) with an optional
    ``max_rank``. ``targets``: module names selecting module types (PEFT's suffix rule; default every
    Linear/Conv1D/Conv2d weight); ``embeddings``: also Embedding weights. ``modules_to_save``: write
    changed non-target modules as full copies. ``mapper``: runs :func:`extract_task` over the chunks
    (builtin ``map``; :func:`lora_lens.dist.dask_mapper` for Dask); ``compute`` / ``options``: device,
    dtype, chunk budget, seed. Refused (bad input): checkpoints of different architectures, a tuned
    checkpoint equal to the base, an unknown target, a rank rule out of range.
    """
    if rank is not None and method not in (None, "rank"):
        raise ConfigError(f"--rank {rank} and --method {method} both given; expected one of them.")
    if method in (None, "rank"):
        method, param = "rank", rank if rank is not None else param
        if param is None:
            raise ConfigError("no rank given; expected --rank R, or --method sv_ratio|sv_fro|sv_cumulative|energy "
                              "with --param P.")
    elif param is None:
        raise ConfigError(f"--method {method} needs --param P (see docs/weights.md for its range).")
    cx = as_compute(compute, **options)
    settings = ExtractSettings(method, param, max_rank, oversample, n_iter, cx)
    base = base if isinstance(base, BaseWeights) else open_base(base)
    tuned = tuned if isinstance(tuned, BaseWeights) else open_base(tuned)
    check_same_architecture(base, tuned)
    layouts = select_targets(candidate_layouts(base, embeddings), targets, f"base checkpoint {base.path}")
    if not layouts:
        raise ConfigError(f"{base.path}: no weight a LoRA can hold (2-D Linear/Conv1D, Conv2d kernels"
                          f"{', embeddings' if embeddings else ''}); expected a transformer or diffusion checkpoint.")
    tasks = plan_extract(base, tuned, layouts, settings)
    if mapper is not None:  # workers open the files by path: make sure they are the same files
        tasks = [replace(t, base=str(Path(t.base).resolve()), tuned=str(Path(t.tuned).resolve())) for t in tasks]
    results: list[ModuleExtract] = []
    done = 0
    for part in (mapper or map)(extract_task, tasks):
        results += part
        done += len(part)
        if progress:
            progress(done, len(layouts), part[0].weight if part else "")
    order = {w: i for i, w in enumerate(layouts)}
    results.sort(key=lambda r: order[r.weight])
    others = _changed_others(base, tuned, set(layouts))
    written = [r for r in results if r.rank > 0]
    unchanged = tuple(r.name for r in results if r.rank == 0)
    if not written and not others:
        raise ConfigError(f"{tuned.path}: every tensor equals --base {base.path} (ΔW = 0 everywhere); expected a "
                          "fine-tuned checkpoint. Check that --tuned and --base are not the same model.")
    notes, saves, save_tensors = [], [], {}
    lora_modules = {r.name for r in written}
    inside = [n for n in others if _module_of(n) in lora_modules or n in layouts]
    if inside:
        notes.append(f"{len(inside)} changed tensor(s) of LoRA target modules are not represented (PEFT's plain "
                     f"LoRA holds no bias), e.g. '{inside[0]}'.")
    rest = [n for n in others if n not in inside]
    if rest and modules_to_save:
        saves = list(dict.fromkeys(_module_of(n) for n in rest))
        for mod in saves:  # the whole module: PEFT's ModulesToSaveWrapper loads every tensor of it
            for n in tuned.names():
                if _module_of(n) == mod and _is_float(tuned.info(n).dtype):
                    save_tensors[n] = tuned.get(n).contiguous()
        notes.append(f"{len(rest)} changed tensor(s) outside the targets written as modules_to_save "
                     f"({len(saves)} module(s), full copies), e.g. '{rest[0]}'.")
    elif rest:
        notes.append(f"{len(rest)} changed tensor(s) outside the targets left out (no modules_to_save), "
                     f"e.g. '{rest[0]}'.")
    if unchanged:
        notes.append(f"{len(unchanged)} target weight(s) equal in both checkpoints: not written.")
    res = Extraction(str(base.path), str(tuned.path), None if out_dir is None else str(out_dir), method, float(param),
                     max_rank, tuple(results), tuple(saves), unchanged, tuple(notes))
    if out_dir is not None:
        _write(res, written, base, tuned, out_dir, save_tensors, overwrite)
    return res


def _write(res: Extraction, written: list[ModuleExtract], base: BaseWeights, tuned: BaseWeights,
           out_dir: str | Path, save_tensors: dict[str, torch.Tensor], overwrite: bool) -> None:
    from ..io.peft import save_peft_adapter

    if not written:
        raise ConfigError(f"{tuned.path}: no target weight changed (only tensors outside the targets, e.g. "
                          f"'{next(iter(save_tensors), '?')}'), so there is nothing for a LoRA to hold; expected a "
                          "fine-tune of the targets. Choose other --targets (or --embeddings).")
    modules = []
    for r in written:
        stored = tuned.info(r.weight).dtype
        dtype = {"BF16": torch.bfloat16, "bfloat16": torch.bfloat16, "F16": torch.float16,
                 "float16": torch.float16}.get(str(stored).removeprefix("torch."))
        B, A = (r.B, r.A) if dtype is None else (r.B.to(dtype), r.A.to(dtype))
        if not (bool(torch.isfinite(A).all()) and bool(torch.isfinite(B).all())):
            raise NonFiniteError(f"'{r.name}': the extracted factors are not finite in {dtype}; nothing was written. "
                                 "Use a smaller rank or check the checkpoints.")
        modules.append(LoraModule(r.name, r.key, A, B, alpha=float(r.rank), scaling=1.0, layout=r.layout,
                                  kernel=r.kernel))
    save_peft_adapter(out_dir, modules, base_model_name_or_path=str(base.path),
                      modules_to_save=list(res.modules_to_save) or None, extra_tensors=save_tensors,
                      metadata={"lora_lens_extracted_from": str(tuned.path)}, overwrite=overwrite)
