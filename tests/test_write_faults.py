"""Faults while writing: SIGKILL mid-write, read-only or file destinations, disk full, two writers.

Kills are real: the command runs in a forked child (everything already
imported, so a run costs a fraction of a second) that SIGKILLs itself at the
k-th file-system step of an atomic write — a temp created, half a file
written, a file fsynced, a rename. k ranges over every step of the command
(counted by an unkilled run), so the kill lands at each point where a partial
output could appear. After each kill the destination must hold nothing or a
complete output; one more run must succeed and leave no temporaries behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from lora_lens_cli.main import main
from lora_lens.io import atomic

from .cli_utils import assert_bad_input
from .hostile_files import write_adapter

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")

PNG_END = b"IEND\xaeB`\x82"


def _install_kill_hook(kill_at: int | None, counter_file: Path, set_attr=setattr) -> None:
    """Count file-system steps of atomic writes; SIGKILL this process at step ``kill_at`` (None: never).

    ``set_attr`` is ``monkeypatch.setattr`` when the hook is installed in the test process itself.
    """
    steps = [0]

    def tick():
        steps[0] += 1
        counter_file.write_text(str(steps[0]))
        if steps[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name):
        real = getattr(owner, name)

        def hooked(*args, **kwargs):
            tick()
            return real(*args, **kwargs)
        set_attr(owner, name, hooked)

    real_write_all = atomic._write_all

    def write_all_in_halves(f, data):
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        tick()  # a kill here leaves a half-written temporary file
        real_write_all(f, data[half:])

    set_attr(atomic, "_write_all", write_all_in_halves)
    for owner, name in ((tempfile, "mkdtemp"), (tempfile, "mkstemp"), (os, "replace"), (os, "fsync")):
        wrap(owner, name)


def run_forked(args: list, kill_at: int | None = None, timeout: float = 120) -> tuple[int | str, int]:
    """Run the CLI in a forked child: (exit code or "killed", number of write steps it reached)."""
    with tempfile.NamedTemporaryFile(delete=False) as cf:
        counter = Path(cf.name)
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 98
        try:
            _install_kill_hook(kill_at, counter)
            code = CliRunner().invoke(main, list(map(str, args))).exit_code
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{args[0]} still running after {timeout} s")
        time.sleep(0.02)
    steps = int(counter.read_text() or 0)
    counter.unlink()
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed", steps
    return os.WEXITSTATUS(status), steps


def complete_output(folder: Path) -> dict[str, int]:
    """Every file of an output folder checked for completeness; returns {relative name: size}."""
    files = {str(p.relative_to(folder)): p for p in folder.rglob("*") if p.is_file()}
    for name, p in files.items():
        assert not Path(name).name.startswith("."), f"temporary file {name} inside the output"
        if name.endswith(".safetensors"):
            load_file(p)
        elif name.endswith(".json"):
            json.loads(p.read_text())
        elif name.endswith(".png"):
            assert p.read_bytes().endswith(PNG_END), name
        elif name.endswith(".html"):
            assert p.read_text().rstrip().endswith("</html>"), name
    return {n: p.stat().st_size for n, p in files.items()}


def _commands(stories: Path, adapter: Path, out: Path) -> dict[str, list]:
    return {
        "cora init": ["cora", "init", "--base", stories, "--rank", "4", "--targets", "q_proj,v_proj", "--mode", "frozen",
                      "-o", out],
        "train": ["train", "--base", stories, "--method", "lora", "--steps", "1", "--batch-size", "4", "--seq-len", "16", "--eval-fraction", "0.02",
                  "--targets", "q_proj", "-o", out],
        "report": ["report", adapter, "-o", out],
    }


@pytest.mark.parametrize("command, max_points", [("cora init", 40), ("train", 3), ("report", 2)])
def test_sigkill_at_write_steps_leaves_nothing_or_a_complete_output(stories_path, tmp_path, command, max_points):
    adapter = write_adapter(tmp_path / "adapter")
    out = tmp_path / "dest" / "out"
    args = _commands(stories_path, adapter, out)[command]
    # The reference run is in this process: it counts the steps and imports what the command needs, so
    # each forked child starts warm.
    counter = tmp_path / "steps"
    with pytest.MonkeyPatch.context() as mp:
        _install_kill_hook(None, counter, mp.setattr)
        r = CliRunner().invoke(main, list(map(str, args)))
    steps = int(counter.read_text())
    assert r.exit_code == 0 and steps > 0, r.output
    reference = complete_output(out)
    # Every step, or (train and report retrain/redraw each time: slow) a seeded sample with the first and last.
    points = list(range(1, steps + 1))
    if len(points) > max_points:
        points = sorted({1, steps, *random.Random(0).sample(points[1:-1], max_points - 2)})
    for k in points:
        code, _ = run_forked([*args, "--overwrite"], kill_at=k)
        assert code == "killed", (k, code)
        if out.exists():  # the previous complete output, or the new complete one — never a mixture
            assert complete_output(out).keys() == reference.keys(), k
    code, _ = run_forked([*args, "--overwrite"])
    assert code == 0 and complete_output(out).keys() == reference.keys()
    # the killed runs' temporaries, half-written files, replaced folders and lock files are gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_a_second_writer_of_the_same_destination_is_refused(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    out = tmp_path / "rep"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process that claimed `out` and is still working on it
        code = 1
        try:
            atomic.check_destination(out)
            os.write(ready_w, b"1")
            os.read(go_r, 1)
            code = 0
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"1"
        r = CliRunner().invoke(main, ["report", str(adapter), "-o", str(out)])
        assert_bad_input(r, "another lora-lens process", f"pid {pid}", "is writing it now")
        assert not out.exists()
    finally:
        os.write(go_w, b"1")
        os.waitpid(pid, 0)
    # its holder gone (here it exited; a SIGKILL drops the flock the same way), the next run proceeds
    r = CliRunner().invoke(main, ["report", str(adapter), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "rep"]


def test_two_writers_at_once_one_wins_no_mixture(stories_path, tmp_path):
    out = tmp_path / "cora"
    args = ["cora", "init", "--base", stories_path, "--rank", "4", "--targets", "q_proj", "-o", out, "--overwrite"]
    go_r, go_w = os.pipe()
    pids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            code = 98
            try:
                os.read(go_r, 1)  # both start together
                code = CliRunner().invoke(main, list(map(str, args)), catch_exceptions=True).exit_code
            finally:
                os._exit(code)
        pids.append(pid)
    os.write(go_w, b"11")
    codes = sorted(os.WEXITSTATUS(os.waitpid(p, 0)[1]) for p in pids)
    assert codes in ([0, 0], [0, 2]), codes  # one refused, or the two ran one after the other
    complete_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cora"]


@pytest.mark.parametrize("command", ["cora init", "train", "report"])
def test_destination_that_is_a_file(stories_path, tmp_path, command):
    adapter = write_adapter(tmp_path / "adapter")
    out = tmp_path / "taken"
    out.write_text("keep me")
    r = CliRunner().invoke(main, list(map(str, _commands(stories_path, adapter, out)[command])))
    assert_bad_input(r, "taken", "is a file")
    assert out.read_text() == "keep me"


def test_read_only_destination_injected(tmp_path, monkeypatch):
    adapter = write_adapter(tmp_path / "adapter")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", read_only)
    r = CliRunner().invoke(main, ["report", str(adapter), "-o", str(tmp_path / "rep")])
    assert_bad_input(r, "rep", "Read-only file system", "writable -o folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_disk_full_injected(stories_path, tmp_path, monkeypatch):
    written = []

    def disk_full(f, data):
        f.write(data[: len(data) // 3])
        written.append(f.name)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_write_all", disk_full)
    out = tmp_path / "cora"
    r = CliRunner().invoke(main, list(map(str, _commands(stories_path, tmp_path, out)["cora init"])))
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0], r.stderr
    assert "internal error" not in r.stderr and "Traceback" not in r.output
    assert written and not out.exists() and list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _tmpfs(path: Path, options: str):
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the injected-fault tests cover this case")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_disk_full_on_a_real_small_tmpfs(stories_path, tmp_path):
    with _tmpfs(tmp_path / "small", "size=8k") as mnt:  # the init needs ~20 kB
        r = CliRunner().invoke(main, list(map(str, _commands(stories_path, tmp_path, mnt / "cora")["cora init"])))
        assert r.exit_code == 1 and "no space left" in r.stderr, r.output
        assert list(mnt.iterdir()) == []  # nothing partial, no temporaries, no lock file


def test_read_only_real_tmpfs(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as mnt:
        r = CliRunner().invoke(main, ["report", str(adapter), "-o", str(mnt / "rep")])
        assert_bad_input(r, "rep", "Read-only file system")


def test_failed_replacement_puts_the_previous_output_back(tmp_path, monkeypatch):
    """--overwrite moves the old folder aside, then renames the new one in; if that rename fails the old one
    returns (before, it was left at .NAME.old-PID and the next run's clean-up deleted it)."""
    import lora_lens.io.atomic as atomic

    dest = tmp_path / "out"
    with atomic.atomic_directory(dest) as d:
        (d / "file.txt").write_text("previous")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder onto dest
            raise OSError(errno.EIO, "simulated I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError):
        with atomic.atomic_directory(dest, overwrite=True) as d:
            (d / "file.txt").write_text("new")
    monkeypatch.undo()
    assert (dest / "file.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
