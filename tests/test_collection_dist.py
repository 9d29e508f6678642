"""Collections on an external Dask cluster: a ``dask scheduler`` and a ``dask worker`` started as subprocesses.

Checks the same numbers as in-process, a worker that dies mid-task (re-run, then given up with one line and
exit 1, nothing written), a task that succeeds on its retry, and an unreachable scheduler (exit 2, the address).
All offline, on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_lens.compare.collection import CollectionSettings, collection_similarity, module_task

from .cli_utils import assert_bad_input, run

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.slow  # a cluster start and worker restarts: ~10-20 s for the module on 2 cores

ROOT = Path(__file__).resolve().parents[1]
#: The one worker dies at most twice per test; the scheduler gives a task up after its second death.
ALLOWED_FAILURES = 1


# The worker unpickles these by reference: it imports this module (PYTHONPATH names the checkout's root).
def _die(task):
    """A module task whose worker process dies (as one killed by the OOM killer would)."""
    os._exit(17)


class _DieOnce:
    """A module task that kills its worker the first time any worker runs it (a marker file says it did)."""

    __name__ = "die_once"

    def __init__(self, marker: str):
        self.marker = marker

    def __call__(self, task):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(17)
        return module_task(task)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Seconds for an interpreter start (a scheduler, a worker, or a worker its nanny restarts) on a loaded 2-core machine.
START_TIMEOUT = 60


@pytest.fixture(scope="module")
def _cluster():
    """``tcp://127.0.0.1:PORT`` of a running scheduler with one single-threaded worker (under a nanny,
    which restarts it when it dies); both stopped afterwards, whatever happened."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(ALLOWED_FAILURES)}
    dask = [sys.executable, "-m", "dask"]
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "start_new_session": True}
    procs: list[subprocess.Popen] = []
    try:
        for attempt in range(3):  # the port is free when asked, not necessarily when the scheduler binds it
            addr = f"tcp://127.0.0.1:{_free_port()}"
            procs.append(subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port",
                                                  addr.rsplit(":", 1)[1], "--no-dashboard"], **quiet))
            procs.append(subprocess.Popen(dask + ["worker", addr, "--host", "127.0.0.1", "--nworkers", "1",
                                                  "--nthreads", "1", "--no-dashboard", "--death-timeout",
                                                  str(START_TIMEOUT)], **quiet))
            if _wait_for_worker(addr, procs[-2:]):
                break
            _stop(procs)
            procs.clear()
        else:
            pytest.fail("a dask scheduler on 127.0.0.1 exited at start three times (port taken?)")
        yield addr
    finally:
        _stop(procs)


@pytest.fixture
def scheduler(_cluster):
    """The module's cluster, with its worker up: a test that killed it leaves the nanny restarting it."""
    if not _wait_for_worker(_cluster, []):
        pytest.fail(f"the dask worker of {_cluster} did not come back within {START_TIMEOUT} s")
    return _cluster


def _wait_for_worker(addr: str, procs: list[subprocess.Popen]) -> bool:
    """Whether ``addr`` has a worker within :data:`START_TIMEOUT` s; False at once if one of ``procs`` exited."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            return False
        try:
            with distributed.Client(addr, timeout="5s") as c:
                c.wait_for_workers(1, timeout=max(1, deadline - time.monotonic()))
            return True
        except (OSError, TimeoutError):
            time.sleep(0.5)
    return False


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (a nanny and the worker it spawned), then SIGKILL what is left of it."""
    for p in reversed(procs):
        _signal_group(p, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(p, signal.SIGKILL)  # also a worker child that outlived its nanny
        p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:  # already gone
        pass


def test_external_scheduler_gives_the_in_process_numbers(planted_collection, scheduler):
    from lora_lens.dist import dask_mapper

    paths, _ = planted_collection
    st = CollectionSettings(device="cpu", dtype="float32", shared_rank=12)
    ref = collection_similarity(paths, st)
    with dask_mapper(scheduler) as mapper:
        got = collection_similarity(paths, st, mapper=mapper)
    # The same function on the same files in another process: 1e-6 is the requirement (bitwise equal
    # in practice: same BLAS, one thread each).
    torch.testing.assert_close(got.phi, ref.phi, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.random_phi, ref.random_phi, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.shared_energy()[1], ref.shared_energy()[1], rtol=0, atol=1e-6)


def test_a_worker_dying_every_time_exits_1_naming_the_module_and_writes_nothing(
        planted_collection, scheduler, monkeypatch, tmp_path):
    monkeypatch.setattr("lora_lens.compare.collection.module_task", _die)
    paths, _ = planted_collection
    out = tmp_path / "coll"
    r = run("collection", *paths, "-o", out, "--scheduler", scheduler, "--device", "cpu", "-q")
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    assert re.search(r"_die\(layers\.\d\.self_attn\.[qv]_proj\): its Dask worker died 2 times", lines[0]), lines[0]
    assert scheduler in lines[0] and ALLOWED_FAILURES + 1 == 2
    assert not out.exists()  # no collection.json, not even a partial folder


def test_a_task_whose_worker_died_once_is_rerun_and_the_run_completes(
        planted_collection, scheduler, monkeypatch, tmp_path):
    monkeypatch.setattr("lora_lens.compare.collection.module_task", _DieOnce(str(tmp_path / "died")))
    paths, _ = planted_collection
    st = CollectionSettings(device="cpu", shared_rank=12)
    from lora_lens.dist import dask_mapper

    with dask_mapper(scheduler) as mapper:
        got = collection_similarity(paths, st, mapper=mapper)
    assert (tmp_path / "died").exists()  # a worker did die
    ref = collection_similarity(paths, st)  # in-process: _die_once finds the marker and computes
    torch.testing.assert_close(got.phi, ref.phi, rtol=0, atol=1e-6)


def test_unreachable_scheduler_exits_2_naming_the_address(planted_collection, monkeypatch, tmp_path):
    # Nothing listens on a port just freed; a 1 s wait instead of the default 10 s keeps the test short.
    monkeypatch.setattr("lora_lens.dist.CONNECT_TIMEOUT", 1)
    paths, _ = planted_collection
    addr = f"tcp://127.0.0.1:{_free_port()}"
    t = time.monotonic()
    assert_bad_input(run("collection", *paths[:2], "-o", tmp_path / "o", "--scheduler", addr), addr, "within 1 s")
    assert time.monotonic() - t < 30 and not (tmp_path / "o").exists()
