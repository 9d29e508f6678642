"""Planning a collection: the run's settings, and one :class:`ModuleTask` per module shared by the inputs.

:func:`plan_collection` reads every file's header (:mod:`lora_lens.io.lazy`:
names, shapes, ranks, scaling; no tensor), matches modules across adapters by
their normalized path, checks shapes, and makes one picklable task per module —
the unit of work a worker computes (:mod:`.collection_kernel`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import Sequence

from ..compute import Compute, as_compute
from ..errors import ConfigError, KeyMatchError, ShapeError
from ..io.lazy import AdapterIndex, index_once
from ..jsonable import JsonFields, fields_dict
from ..keys import normalize_module_path, parse_module_path
from .baselines import DRAWS
from .subspaces import resolve_side

_KEEP = object()  # an InitVar left out: keep what ``compute`` says


@dataclass(frozen=True)
class CollectionSettings(JsonFields):
    """Run-wide options of a collection, resolved once on the client and shipped with every task.

    ``top_k``: directions compared (None: each pair's smaller rank, per module; capped at it).
    ``side``: which singular vectors φ compares: ``out`` (ΔW's output space; None resolves to it, the
    default for the reason in :data:`~.subspaces.SIDE_WHY`), ``in``, or ``both`` (their mean) — as in
    ``similarity``.
    ``shared_rank``: ``R`` of the reported shared basis (None: the largest
    rank). ``curve_rank``: the energy curves go to ``R = curve_rank`` (None:
    ``4·shared_rank``), clipped at ``min(m, n, Σ r)``. ``keep_basis``: return
    the bases (for ``--write-basis``). ``draws``: Haar samples of the random
    baseline per module and side.

    ``compute``: device, dtype, chunk budget and seed (:class:`~lora_lens.compute.Compute`;
    its progress callback is dropped, tasks travel to other processes). Every
    random draw of a module is seeded by :meth:`Compute.seed_for` of the
    module's name, so the numbers do not depend on module order or on which
    worker runs what. For convenience ``device``/``dtype``/``max_memory``/``seed``
    may be given as keywords (folded into ``compute`` by :func:`~lora_lens.compute.as_compute`).

    ``worker_device``: a device string each worker resolves itself (``auto``:
    that worker's GPU), used instead of ``compute.device`` — for a Dask cluster
    whose workers have devices the client lacks.
    """

    top_k: int | None = None
    side: str | None = None
    weighted: bool = False
    shared_rank: int | None = None
    curve_rank: int | None = None
    keep_basis: bool = False
    draws: int = DRAWS
    #: Power iterations of CoRA's kernel on the Gram of the stacked factors (each counts twice on the
    #: factors themselves, since the Gram squares the spectrum): 4 here ≈ CoRA's 8 on the matrix.
    n_iter: int = 4
    compute: Compute = field(default_factory=Compute)
    worker_device: str | None = None
    device: InitVar[object] = _KEEP
    dtype: InitVar[object] = _KEEP
    max_memory: InitVar[object] = _KEEP
    seed: InitVar[object] = _KEEP

    def __post_init__(self, device, dtype, max_memory, seed) -> None:
        given = {k: v for k, v in (("device", device), ("dtype", dtype), ("max_memory", max_memory),
                                   ("seed", seed)) if v is not _KEEP}
        object.__setattr__(self, "compute", replace(as_compute(self.compute, **given), progress=None))
        object.__setattr__(self, "side", resolve_side("delta", self.side))

    def to_dict(self) -> dict:
        # reshaped: the Compute flattened into the names of the CLI options (device, dtype, seed, max_memory)
        cp = self.compute
        d = fields_dict(self, exclude=("compute", "worker_device"))
        d.update(device=self.worker_device or str(cp.device), dtype=cp.dtype_name, seed=cp.seed,
                 max_memory=cp.max_memory)
        return d


@dataclass(frozen=True)
class ModuleTask:
    """One module across the adapters that have it: what a worker needs to compute it (picklable)."""

    name: str
    module_type: str
    shape: tuple[int, int]
    members: tuple[int, ...]
    paths: tuple[str, ...]
    names: tuple[str, ...]
    ranks: tuple[int, ...]
    shared_rank: int
    settings: CollectionSettings
    layout: str = "linear"


def plan_collection(
    paths: Sequence[str | Path], settings: CollectionSettings = CollectionSettings(), *, allow_partial: bool = False
) -> tuple[list[ModuleTask], tuple[str, ...], dict, dict]:
    """Read every file's header, match modules across adapters, and make one task per module.

    Returns ``(tasks, labels, partial, skipped)``: ``partial[name]`` lists the
    adapters a compared module is missing from; ``skipped[name]`` says why a
    module was left out or narrowed (in one adapter only; under ``allow_partial``
    a module whose shapes differ is compared over the adapters of its most common shape).
    """
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ConfigError(f"a collection needs at least two adapters; got {len(paths)}. "
                          "Use `lora-lens spectrum`/`similarity` for one adapter.")
    seen: dict[str, str] = {}
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ConfigError(f"{p}: is listed twice (also as {seen[real]}); expected each adapter once. "
                              "Remove the duplicate line.")
        seen[real] = p
    # Cached per process: an in-process run's module tasks reuse these headers instead of parsing them again.
    indexes = [index_once(p) for p in paths]
    labels = _labels(indexes)
    # key (backbone prefixes stripped) → [(adapter i, name in that file, ref)]
    found: OrderedDict[str, list] = OrderedDict()
    for i, ix in enumerate(indexes):
        for name, ref in ix.refs.items():
            found.setdefault(normalize_module_path(name), []).append((i, name, ref))
    found = OrderedDict(sorted(found.items(), key=lambda kv: parse_module_path(kv[0]).sort_key()))
    partial, skipped, tasks = {}, {}, []
    for key, members in found.items():
        shapes = OrderedDict()
        for i, name, ref in members:
            shapes.setdefault(ref.shape, []).append(i)
        if len(shapes) > 1:
            (s0, a0), (s1, a1) = list(shapes.items())[:2]
            msg = (f"module '{key}' is {s0[0]}×{s0[1]} in {paths[a0[0]]} but {s1[0]}×{s1[1]} in {paths[a1[0]]}")
            if not allow_partial:
                raise ShapeError(f"{msg}; expected adapters of one base. Pass --allow-partial to compare only the "
                                 "modules whose shapes agree.")
            keep = max(shapes, key=lambda sh: len(shapes[sh]))  # the most common shape (first on ties)
            skipped[key] = f"shapes differ ({msg}); compared over the {len(shapes[keep])} adapters of shape {keep}"
            members = [x for x in members if x[2].shape == keep]
        if len(members) < 2:
            skipped[key] = (skipped.get(key, "") + "; " if key in skipped else "") + f"only in {labels[members[0][0]]}"
            continue
        if len(members) < len(paths):
            have = {i for i, _, _ in members}
            partial[key] = [labels[i] for i in range(len(paths)) if i not in have]
        ref0 = members[0][2]
        ranks = tuple(ref.rank for _, _, ref in members)
        tasks.append(ModuleTask(
            name=key, module_type=ref0.key.module, shape=ref0.shape, members=tuple(i for i, _, _ in members),
            paths=tuple(os.path.abspath(paths[i]) for i, _, _ in members),  # a worker may run in another folder
            names=tuple(name for _, name, _ in members), ranks=ranks,
            shared_rank=settings.shared_rank or max(ranks), settings=settings, layout=ref0.layout,
        ))
    if not tasks:
        raise KeyMatchError(f"no LoRA module is shared by two of the {len(paths)} adapters "
                            f"(e.g. {list(found)[:2]}); expected adapters trained on the same modules of one base.")
    lonely = [labels[i] for i in range(len(paths)) if not any(i in t.members for t in tasks)]
    if lonely and not allow_partial:
        raise KeyMatchError(f"{lonely[0]} shares no LoRA module with the other adapters; expected adapters of one "
                            "base. Pass --allow-partial to compare the others anyway.")
    return tasks, labels, partial, skipped


def _labels(indexes: Sequence[AdapterIndex]) -> tuple[str, ...]:
    """Folder names; a name used twice gets its parent folder (then its position) to tell them apart."""
    labels = [ix.label for ix in indexes]
    for i, ix in enumerate(indexes):
        if labels.count(ix.label) > 1:
            labels[i] = f"{Path(ix.path).parent.name}/{ix.label}"
    if len(set(labels)) < len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    return tuple(labels)
