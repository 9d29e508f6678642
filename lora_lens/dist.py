"""Optional Dask execution of per-item work (the only module that imports Dask, lazily).

:func:`dask_mapper` yields a ``mapper(fn, items)`` for
:func:`lora_lens.compare.collection.collection_similarity`: each item (one
module across all files) becomes one Dask task; the workers read the files
themselves (they must see the same paths: a shared filesystem) and send back
only the small per-module results, in item order. Needs ``pip install
'lora-lens[dist]'`` (``dask[distributed]``).

- ``scheduler="local"``: a :class:`distributed.LocalCluster` of ``workers``
  processes (``processes=False``: threads in this process, for tests);
- ``scheduler="tcp://HOST:8786"``: an existing ``dask scheduler`` with its
  ``dask worker``s (see docs/collections.md).

Failures:

- a scheduler that does not answer, or has no worker, within ``timeout``
  seconds: :class:`~lora_lens.errors.ConfigError` naming the address (bad input);
- a worker that dies while it runs a task (killed, out of memory, a crash):
  the scheduler re-runs the task on a worker that is alive; after
  ``distributed.scheduler.allowed-failures`` deaths (``RETRIES`` on a local
  cluster; an external scheduler's own config, Dask's default 3) the task is
  given up and :class:`WorkerDiedError` names it and the scheduler;
- an exception raised by the task is re-run ``RETRIES`` times (a flaky shared
  filesystem), then raised here as itself (a corrupt file stays a
  ``CheckpointError``).

Nothing is returned until every task has succeeded, so no partial result is ever written.
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .errors import ConfigError

#: Seconds to wait for a remote scheduler (and for its first worker) before giving up with a clear message.
CONNECT_TIMEOUT = 10
#: How many times a task is re-run after it raised, or (on a local cluster) after its worker died.
RETRIES = 2


class WorkerDiedError(RuntimeError):
    """A task's worker died more often than the scheduler allows: not bad input, not a bug (the CLI exits 1)."""


def _import_distributed():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("--scheduler needs Dask: pip install 'lora-lens[dist]' (dask[distributed]); "
                          "or leave --scheduler out to run in this process.") from None
    return distributed


def _item_name(item, i: int) -> str:
    """What a task is called in messages and Dask keys: the item's ``name`` (a module), else its position."""
    name = getattr(item, "name", None)
    return str(name) if name else f"item {i}"


@contextmanager
def dask_mapper(
    scheduler: str = "local",
    workers: int | None = None,
    processes: bool = True,
    threads_per_worker: int = 1,
    timeout: float | None = None,
) -> Iterator[Callable[[Callable, Sequence], list]]:
    """A ``mapper(fn, items)`` running ``fn`` over ``items`` on a Dask cluster; closes it on exit.

    ``timeout``: seconds to wait for a remote scheduler and its first worker (None: :data:`CONNECT_TIMEOUT`).
    """
    distributed = _import_distributed()
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    import dask

    cluster = client = None
    try:
        if scheduler == "local":
            # The scheduler reads allowed-failures when it starts: a task whose worker dies is re-run RETRIES times.
            with dask.config.set({"distributed.scheduler.allowed-failures": RETRIES}):
                cluster = distributed.LocalCluster(n_workers=workers or 2, threads_per_worker=threads_per_worker,
                                                   processes=processes, dashboard_address=None)
            client = distributed.Client(cluster)
        else:
            try:
                client = distributed.Client(scheduler, timeout=f"{timeout}s")
            except (OSError, TimeoutError, ValueError) as e:
                raise ConfigError(f"--scheduler {scheduler}: no Dask scheduler answered within {timeout:g} s "
                                  f"({type(e).__name__}); expected a running `dask scheduler` at that address "
                                  "(tcp://HOST:8786), or use --scheduler local.") from None
            try:
                client.wait_for_workers(1, timeout=timeout)
            except (OSError, TimeoutError):
                raise ConfigError(f"--scheduler {scheduler}: the scheduler answered but has no worker after "
                                  f"{timeout:g} s; start `dask worker {scheduler}` on machines that see the "
                                  "adapter files.") from None
    except BaseException:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        raise
    address = scheduler if scheduler != "local" else f"the local cluster at {cluster.scheduler_address}"

    def mapper(fn: Callable, items: Sequence) -> list:
        items = list(items)
        names = [_item_name(it, i) for i, it in enumerate(items)]
        # Named keys (unique per call), so a failure can say which module it was.
        run = uuid.uuid4().hex[:8]
        keys = [f"{getattr(fn, '__name__', 'task')}-{name}-{run}-{i}" for i, name in enumerate(names)]
        futures = client.map(fn, items, key=keys, retries=RETRIES)
        try:
            return client.gather(futures)
        except distributed.KilledWorker as e:
            what = f"{getattr(fn, '__name__', 'task')}({names[keys.index(e.task)] if e.task in keys else e.task})"
            last = getattr(e.last_worker, "address", e.last_worker)
            raise WorkerDiedError(
                f"{what}: its Dask worker died {e.allowed_failures + 1} times (last {last}, scheduler {address}), "
                "so the task was given up and nothing was written; check the workers' logs and memory limit "
                "(--memory-limit of dask worker) and rerun.") from None
        finally:
            client.cancel(futures)

    try:
        yield mapper
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
