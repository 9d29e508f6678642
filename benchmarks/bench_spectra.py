"""Spectra of a Llama-7B-shaped r=16 adapter: lora_lens (factored, batched) vs the naive SVD of ΔW.

The adapter: 7 projections × 32 layers = 224 LoRA modules with random
factors (q, k, v, o 4096×4096; gate, up 11008×4096; down 4096×11008), built
in memory. Timed in one process:

- lora_lens ``adapter_spectra`` end to end (singular values and every metric
  of all 224 modules), best and median of ``--repeat`` runs;
- ``decompose_adapter`` (also U and Vᵀ, what the compare stage uses);
- the naive approach (what PEFT's conversion, weightwatcher or kohya's resize
  do): materialize ``ΔW = s·B·A`` and ``torch.linalg.svdvals``. It is timed on
  ONE matrix of each of the 3 shapes and extrapolated to all 224 modules
  (about half an hour otherwise); the output says so;
- the accuracy: max relative difference of the top-r singular values of
  lora_lens (float32) against a float64 SVD of the materialized ΔW, one matrix
  per shape;
- the CLI end to end (``python -m cli.main spectrum DIR --json``) on the
  adapter saved to a temporary folder, in a subprocess (Python start-up,
  imports, reading 160 MB of factors and JSON included);
- with a CUDA device: ``adapter_spectra(device="cuda")`` and the naive SVD on
  the GPU, and GPU vs CPU.

Usage::

    python benchmarks/bench_spectra.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lora_lens import save_peft_adapter  # noqa: E402
from lora_lens.decompose import decompose_adapter  # noqa: E402
from lora_lens.spectra import adapter_spectra  # noqa: E402
from lora_lens.types import LayerKey, LoraModule  # noqa: E402

SHAPES = {  # module type → (m, n) of ΔW in PyTorch's layout
    "self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
    "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
    "mlp.down_proj": (4096, 11008),
}


def llama7b_adapter(rank: int = 16, layers: int = 32, alpha: float = 32.0, seed: int = 0) -> list[LoraModule]:
    """Random factors at trained-adapter scale: A like PEFT's Kaiming init, B small and non-zero."""
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for block in range(layers):
        for t, (m, n) in SHAPES.items():
            A = torch.randn(rank, n, generator=gen) / n ** 0.5  # (r, n)
            B = torch.randn(m, rank, generator=gen) * 1e-2  # (m, r)
            mods.append(LoraModule(f"model.layers.{block}.{t}", LayerKey("model.layers", block, t), A, B, alpha,
                                   alpha / rank))
    return mods


def timed(fn, repeat: int, sync=None) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return times, out


def naive_svdvals(mod: LoraModule, device: str, dtype: torch.dtype) -> torch.Tensor:
    """What the naive tools do: form ΔW (m, n) and take every singular value."""
    B, A = mod.B.to(device, dtype), mod.A.to(device, dtype)
    return torch.linalg.svdvals(mod.scaling * (B @ A))


def naive_reference(by_shape: dict, res, rank: int) -> tuple[float, float]:
    """Time the naive SVD on one matrix per shape, print a row per shape; return (extrapolated s, worst rel err)."""
    print("naive reference: materialize ΔW = s·B·A (float32) + torch.linalg.svdvals, timed on ONE matrix per shape,")
    print("extrapolated to all modules of that shape; max rel err: top-r singular values against a float64 SVD of")
    print("the materialized ΔW, max_i |Δσ_i|/σ_i, for lora_lens (float32) and for the naive float32 SVD:")
    print(f"  {'shape':<12}{'count':>6}{'1 matrix s':>12}{'all s':>10}{'max rel err ours':>18}{'naive f32':>11}",
          flush=True)
    total, worst = 0.0, 0.0
    for (m, n), group in by_shape.items():
        mod = group[0]
        t = time.perf_counter()
        S32 = naive_svdvals(mod, "cpu", torch.float32)
        t_naive = time.perf_counter() - t
        S64 = naive_svdvals(mod, "cpu", torch.float64)[:rank]  # the float64 reference
        ours = res[mod.name].singular_values  # lora_lens, float32 factored (upcast for the metrics)
        rel = ((ours - S64).abs() / S64).max().item()
        rel_naive = ((S32[:rank].double() - S64).abs() / S64).max().item()
        worst = max(worst, rel)
        total += t_naive * len(group)
        print(f"  {f'{m}x{n}':<12}{len(group):>6}{t_naive:>12.2f}{t_naive * len(group):>10.1f}{rel:>18.1e}"
              f"{rel_naive:>11.1e}", flush=True)
    print(f"  naive total (extrapolated): {total:.0f} s\n")
    return total, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--repeat", type=int, default=7, help="runs of the lora_lens timings (best and median shown)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI subprocess timing")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive reference (minutes)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), CUDA: "
          f"{torch.cuda.get_device_name(0) if cuda else 'none'}")

    mods = llama7b_adapter(args.rank, args.layers)
    n_mod = len(mods)
    fbytes = sum(m.num_bytes for m in mods)
    print(f"adapter: {n_mod} modules (7 projections × {args.layers} layers), r={args.rank}, "
          f"{fbytes / 2**20:.0f} MiB of float32 factors\n")

    # lora_lens, in process
    adapter_spectra(mods, device="cpu")  # warm-up (first-touch allocations, MKL init)
    t_spec, res = timed(lambda: adapter_spectra(mods, device="cpu"), args.repeat)
    t_dec, _ = timed(lambda: decompose_adapter(mods, device="cpu"), max(3, args.repeat // 2))
    best = min(t_spec)

    print(f"{'lora_lens, in process':<52}{'best s':>9}{'median s':>10}")
    print(f"{'  adapter_spectra (CPU, float32, all modules)':<52}{best:>9.3f}{statistics.median(t_spec):>10.3f}")
    print(f"{'  decompose_adapter (U, S, Vh; CPU)':<52}{min(t_dec):>9.3f}{statistics.median(t_dec):>10.3f}\n",
          flush=True)

    by_shape: dict[tuple[int, int], list[LoraModule]] = {}
    for m in mods:
        by_shape.setdefault(m.shape, []).append(m)
    naive_total = float("nan")
    if not args.no_naive:
        naive_total, worst_rel = naive_reference(by_shape, res, args.rank)
        print(f"speed-up adapter_spectra vs naive: {naive_total / best:,.0f}x (best), "
              f"{naive_total / statistics.median(t_spec):,.0f}x (median); "
              f"worst top-{args.rank} relative difference {worst_rel:.1e}")

    if cuda:
        sync = torch.cuda.synchronize
        adapter_spectra(mods, device="cuda")
        t_gpu, _ = timed(lambda: adapter_spectra(mods, device="cuda"), args.repeat, sync)
        mod = by_shape[(11008, 4096)][0]
        naive_svdvals(mod, "cuda", torch.float32)
        t_gn, _ = timed(lambda: naive_svdvals(mod, "cuda", torch.float32), 3, sync)
        print(f"\nGPU: adapter_spectra {min(t_gpu):.3f} s (best), CPU/GPU = {best / min(t_gpu):.1f}x; "
              f"naive svdvals of one 11008x4096 ΔW on the GPU {min(t_gn):.3f} s")

    if not args.no_cli:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "llama7b-r16"
            save_peft_adapter(folder, mods)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                   "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            cmd = [sys.executable, "-m", "cli.main", "spectrum", str(folder), "--json", "--device", "cpu"]
            t_imp, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import cli.main, lora_lens.spectra"],
                                                    env=env, check=True), 3)
            t_cli, out = timed(lambda: subprocess.run(cmd, env=env, check=True, capture_output=True, text=True), 3)
            d = json.loads(out.stdout)
            assert len(d["layers"]) == n_mod
            size = sum(f.stat().st_size for f in folder.iterdir())
            ratio = "" if naive_total != naive_total else f"; {naive_total / min(t_cli):,.0f}x faster than the naive estimate"
            print(f"\nCLI end to end: lora-lens spectrum <{size / 2**20:.0f} MiB adapter> --json --device cpu (subprocess)"
                  f"\n  {min(t_cli):.2f} s best of 3, of which Python start-up + imports {min(t_imp):.2f} s; "
                  f"{len(out.stdout) / 2**10:.0f} KiB of JSON{ratio}")


if __name__ == "__main__":
    main()
