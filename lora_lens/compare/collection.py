"""Collections: N adapters of one base compared at once, one module at a time.

The unit of work is one module across all files (:func:`module_task`): a
plain function of a picklable :class:`ModuleTask` that reads the files itself
(header + two tensors per file, :mod:`lora_lens.io.lazy`) and returns a small
:class:`ModuleResult`, so it runs in-process or on Dask workers
(:mod:`lora_lens.dist`) with the same numbers. :func:`collection_similarity`
plans the tasks, maps them and aggregates:

- :mod:`.collection_plan`: the settings, the file headers matched into one
  :class:`ModuleTask` per module (:func:`plan_collection`);
- :mod:`.collection_kernel`: one module across its adapters (:func:`module_task`),
  the maths and its cost;
- :mod:`.collection_aggregate`: per-module results → the ``(N, N)`` matrices
  (:class:`CollectionSimilarity`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..compute import Progress
from ..errors import ConfigError
from .collection_aggregate import CONVENTIONS, CollectionSimilarity, aggregate
from .collection_kernel import ModuleResult, module_task
from .collection_plan import CollectionSettings, ModuleTask, plan_collection

__all__ = ["CONVENTIONS", "CollectionSettings", "CollectionSimilarity", "Mapper", "ModuleResult", "ModuleTask",
           "aggregate", "collection_similarity", "module_task", "plan_collection"]

#: ``mapper(fn, tasks)`` → results in task order (builtin ``map``, or Dask's, :mod:`lora_lens.dist`).
Mapper = Callable[[Callable, Sequence], Iterable]


def collection_similarity(
    paths: Sequence[str | Path],
    settings: CollectionSettings = CollectionSettings(),
    *,
    allow_partial: bool = False,
    mapper: Mapper | None = None,
    progress: Progress | None = None,
) -> CollectionSimilarity:
    """φ between every pair of ``paths``, per module and aggregated; shared-basis statistics.

    ``mapper`` runs :func:`module_task` over the tasks (builtin ``map`` by
    default, one module at a time; :func:`lora_lens.dist.dask_mapper` for a
    Dask cluster). Only the small per-module results come back here.
    """
    if settings.top_k is not None and settings.top_k < 1:
        raise ConfigError(f"top_k={settings.top_k}; expected a positive number of directions.")
    if settings.shared_rank is not None and settings.shared_rank < 1:
        raise ConfigError(f"shared_rank={settings.shared_rank}; expected a positive rank.")
    tasks, labels, partial, skipped = plan_collection(paths, settings, allow_partial=allow_partial)
    results = []
    for res in (mapper or map)(module_task, tasks):
        results.append(res)
        if progress:
            progress(len(results), len(tasks), res.name)
    return aggregate(results, labels, tuple(str(p) for p in paths), settings, partial, skipped)
