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

A task that fails on a worker which dies is retried by Dask (``retries``);
anything else that fails is raised here, so no partial result is ever written.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

from .errors import ConfigError

#: Seconds to wait for a remote scheduler before giving up with a clear message.
CONNECT_TIMEOUT = 10
#: How many times Dask re-runs a task whose worker died.
RETRIES = 2


def _import_distributed():
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ConfigError("--scheduler needs Dask: pip install 'lora-lens[dist]' (dask[distributed]); "
                          "or leave --scheduler out to run in this process.") from None
    return distributed


@contextmanager
def dask_mapper(
    scheduler: str = "local",
    workers: int | None = None,
    processes: bool = True,
    threads_per_worker: int = 1,
    timeout: float = CONNECT_TIMEOUT,
) -> Iterator[Callable[[Callable, Sequence], list]]:
    """A ``mapper(fn, items)`` running ``fn`` over ``items`` on a Dask cluster; closes it on exit."""
    distributed = _import_distributed()
    cluster = None
    try:
        if scheduler == "local":
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
    except BaseException:
        if cluster is not None:
            cluster.close()
        raise

    def mapper(fn: Callable, items: Sequence) -> list:
        futures = client.map(fn, list(items), pure=False, retries=RETRIES)
        try:
            return client.gather(futures)
        except distributed.KilledWorker as e:
            raise RuntimeError(f"a Dask worker died {RETRIES + 1} times ({e}); nothing was written. "
                               "Check the workers' memory and logs.") from None

    try:
        yield mapper
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
