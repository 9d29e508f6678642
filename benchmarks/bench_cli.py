"""Start-up and end-to-end time of the ``lora-lens`` command, as ratios against floors measured in the same run.

Each timing is a fresh interpreter (``subprocess``), best of ``--repeat``, the
runs of every command interleaved so that a noisy neighbour slows all alike:

- ``python -c "import torch"``: the reference for start-up;
- ``lora-lens --help`` and ``lora-lens spectrum --help``: target < 0.3× the
  torch import (they import neither torch nor matplotlib);
- the floor of the spectrum run: ``import torch`` + reading every tensor of
  the adapter file (``safetensors.torch.load_file``), nothing else;
- ``lora-lens spectrum DIR`` (plain text) and ``--json`` on a synthetic
  Llama-7B-shaped r=16 adapter (224 modules, 160 MiB of float32 factors; built
  by ``bench_spectra.llama7b_adapter``): target ≤ 1.3× the floor.

The commands run from this checkout (``cli/`` imported as ``cli``, what the
installed ``lora_lens_cli`` is). The adapter file is written once and read
once before timing, so every run reads it from the page cache.

Usage::

    python benchmarks/bench_cli.py --threads 2 --repeat 5
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_spectra import llama7b_adapter  # noqa: E402  (same folder)

CLI = "from cli.main import main; main(prog_name='lora-lens')"  # what the lora-lens console script runs


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s: user + system of the child) of one fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL threads of the timed processes (default 2)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of each command; the best counts (default 5)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "MPLBACKEND": "Agg"}
    py = sys.executable

    with tempfile.TemporaryDirectory() as tmp:
        from lora_lens import save_peft_adapter

        folder = Path(tmp) / "llama7b-r16"
        save_peft_adapter(folder, llama7b_adapter(args.rank, args.layers))
        weights = folder / "adapter_model.safetensors"
        size = weights.stat().st_size
        runs = {
            "import torch": [py, "-c", "import torch"],
            "lora-lens --help": [py, "-c", CLI, "--help"],
            "lora-lens spectrum --help": [py, "-c", CLI, "spectrum", "--help"],
            "floor: import torch + read the file": [
                py, "-c", f"import torch; from safetensors.torch import load_file; load_file({str(weights)!r})"],
            "lora-lens spectrum DIR": [py, "-c", CLI, "spectrum", str(folder), "--device", "cpu"],
            "lora-lens spectrum DIR --json": [py, "-c", CLI, "spectrum", str(folder), "--device", "cpu", "--json"],
        }
        for argv in runs.values():  # warm-up: page cache, .pyc files
            timed(argv, env)
        walls: dict[str, list[float]] = {k: [] for k in runs}
        cpus: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeat):
            for name, argv in runs.items():
                w, c = timed(argv, env)
                walls[name].append(w)
                cpus[name].append(c)

    print(f"python {sys.version.split()[0]}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs; adapter: {7 * args.layers} modules, r={args.rank}, {size / 2**20:.0f} MiB; "
          f"best of {args.repeat} fresh processes each (CPU: user + system; steadier than wall on a busy machine)\n")
    print(f"{'command':<40}{'wall s':>9}{'median':>9}{'CPU s':>9}")
    for k in runs:
        print(f"{k:<40}{min(walls[k]):>9.3f}{sorted(walls[k])[len(walls[k]) // 2]:>9.3f}{min(cpus[k]):>9.3f}")
    print()
    for k, ref, target in (
        ("lora-lens --help", "import torch", 0.3),
        ("lora-lens spectrum --help", "import torch", 0.3),
        ("lora-lens spectrum DIR", "floor: import torch + read the file", 1.3),
        ("lora-lens spectrum DIR --json", "floor: import torch + read the file", 1.3),
    ):
        rw, rc = min(walls[k]) / min(walls[ref]), min(cpus[k]) / min(cpus[ref])
        verdict = "met" if max(rw, rc) < target else "NOT met"
        print(f"{k:<30} / {ref.split(':')[0]:<13} wall {rw:5.2f}x  CPU {rc:5.2f}x  (target < {target}x: {verdict})")


if __name__ == "__main__":
    main()
