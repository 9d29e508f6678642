"""Merge of 8 Llama-7B-shaped r=16 adapters, ``--method svd --rank 64``: lora_lens vs PEFT's path (issue 19: ≥ 100×).

Eight adapters as in bench_spectra (224 modules each: q, k, v, o 4096×4096;
gate, up 11008×4096; down 4096×11008; 32 layers; random factors, seeds 0–7),
weights 1/8 … 8/8 normalised, built in memory. Timed in one process:

- lora_lens ``merge_adapters(method="svd", rank=64)`` on all 224 modules: the
  cat adapter's factored SVD (QR R-factors of the stacked (m, 128) / (128, n)
  factors, a 128×128 SVD, the folded rank-64 factors); ΔW is never formed;
- PEFT's ``add_weighted_adapter(combination_type="svd")`` per-module path
  (``_svd_generalized_task_arithmetic_weighted_adapter``): every
  ``get_delta_weight`` (dense ``s·B A``), ``peft.utils.merge_utils.task_arithmetic``,
  ``torch.linalg.svd(full_matrices=True)`` (PEFT's default), then ``U[:, :R] S``
  and ``Vh[:R]``. Too slow for all 224 modules on a few cores, it is timed on
  ``--per-shape`` modules of each of the 3 shapes and extrapolated to
  128 + 64 + 32 modules; the output says so;
- the result: on every module PEFT ran, ‖ΔW_ours − ΔW_PEFT‖_F / ‖ΔW_PEFT‖_F
  (target ≤ 1e-5), and each against a float64 reference (the factored merge
  of that module run on float64 copies of the factors, exact to ~1e-14), which
  says whose float32 round-off a difference is.

Usage::

    python benchmarks/bench_merge.py --threads 2 --per-shape 1
    python benchmarks/bench_merge.py --threads 16 --per-shape 2 --device cuda   # both paths on the GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_spectra import llama7b_adapter  # noqa: E402
from lora_lens.ops.merge import merge_adapters  # noqa: E402
from lora_lens.types import Adapter, LoraSettings  # noqa: E402


def peft_path(mods, weights, rank: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's svd combination for one module: dense ΔWᵢ, task_arithmetic, full SVD, truncation → (B, A).

    On ``device`` (PEFT runs it where the model is); the factors come back to the CPU, timed.
    """
    from peft.utils.merge_utils import task_arithmetic

    # LoraLayer.get_delta_weight (Linear, no fan_in_fan_out)
    deltas = [m.scaling * (m.B.to(device) @ m.A.to(device)) for m in mods]
    delta = task_arithmetic(deltas, torch.tensor(weights, device=device))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=True)
    return (U[:, :rank] @ torch.diag(S[:rank])).cpu(), Vh[:rank, :].cpu()


def reference(adapters, weights, name: str, rank: int) -> torch.Tensor:
    """ΔW of the rank-``rank`` merge of one module from float64 copies of its factors, in float64."""
    from dataclasses import replace

    one = [Adapter(ad.path, ad.settings, (replace(ad[name], A=ad[name].A.double(), B=ad[name].B.double()),))
           for ad in adapters]
    return merge_adapters(one, weights, method="svd", rank=rank, device="cpu", dtype="float64").adapter[name].delta()


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--per-shape", type=int, default=1, help="modules of each shape PEFT's path is timed on")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where both paths run (cuda: lora_lens is also timed on the CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    adapters = [Adapter(Path(f"a{i}"), LoraSettings(r=16, lora_alpha=32.0), tuple(llama7b_adapter(layers=args.layers,
                                                                                              seed=i)))
                for i in range(args.adapters)]
    weights = [(i + 1) / args.adapters for i in range(args.adapters)]
    n_mod = len(adapters[0])
    print(f"{args.adapters} adapters × {n_mod} modules, r=16 → svd rank {args.rank}; threads {args.threads}")

    def timed(device: str):
        times = []
        for _ in range(args.repeat):  # the factors come back to the CPU: the clock includes the transfers
            t = time.perf_counter()
            res = merge_adapters(adapters, weights, method="svd", rank=args.rank, device=device)
            times.append(time.perf_counter() - t)
        return min(times), res

    ours, res = timed(args.device)
    print(f"lora_lens merge --method svd (all {n_mod} modules) on {args.device}   {ours:9.2f} s   (best of {args.repeat})")
    if args.device != "cpu":
        cpu, _ = timed("cpu")
        print(f"lora_lens merge --method svd on the CPU ({args.threads} threads)   {cpu:9.2f} s   "
              f"→ {args.device} vs CPU {cpu / ours:.1f}×")

    counts: dict[tuple[int, int], int] = {}
    for m in adapters[0]:
        counts[m.shape] = counts.get(m.shape, 0) + 1
    per_shape: dict[tuple[int, int], list[float]] = {}
    worst = 0.0
    for shape in counts:
        names = [m.name for m in adapters[0] if m.shape == shape][: args.per_shape]
        for name in names:
            t = time.perf_counter()
            B, A = peft_path([ad[name] for ad in adapters], weights, args.rank, args.device)
            per_shape.setdefault(shape, []).append(time.perf_counter() - t)
            theirs = (B.double() @ A.double())
            mine = res.adapter[name].delta()
            rel = float((mine - theirs).norm() / theirs.norm())
            worst = max(worst, rel)
            ref = reference(adapters, weights, name, args.rank)
            print(f"  PEFT path {name:36s} {shape[0]}×{shape[1]}  {per_shape[shape][-1]:8.2f} s   "
                  f"ours vs PEFT {rel:.2e}; vs float64: ours {_rel(mine, ref):.2e}, PEFT {_rel(theirs, ref):.2e}")
    peft_total = sum(counts[s] * sum(t) / len(t) for s, t in per_shape.items())
    timed = sum(len(t) for t in per_shape.values())
    print(f"PEFT path, extrapolated to all {n_mod} modules from {timed} timed "
          f"({', '.join(f'{counts[s]}×{s[0]}×{s[1]}' for s in counts)})   {peft_total:9.1f} s")
    print(f"speed-up lora_lens / PEFT path                       {peft_total / ours:9.0f}×   (target ≥ 100×)")
    print(f"largest relative difference of ΔW on the timed modules   {worst:.2e}   (target ≤ 1e-5)")


if __name__ == "__main__":
    main()
