"""Extract a LoRA from a full fine-tune: lora_lens vs mergekit's loop of ``torch.linalg.svd``, in one run (ratios).

A synthetic Llama-7B-shaped pair is written to a temp dir in bf16: the base as in bench_finder.py
(``σ_i = i^{-1/2}``, DCT singular vectors, each weight its own permutation) and the tuned model
``bf16(W_base + P)`` with a planted rank-``--planted`` change ``P`` (Gaussian singular vectors,
``σ_i ∝ i^{-1/2}``, ``‖P‖_F = 0.1 ‖W‖_F``), so the stored difference is ``P`` plus the bf16
rounding of the tuned weights (full rank, ≈ 1 % of ``‖P‖_F``).

Measured, each in a fresh process (peak memory of that process alone):

- ``read``: the floor: every weight of both files read and their difference formed in float32;
- ``lora_lens``: :func:`lora_lens.ops.extract.extract_lora` at rank ``--rank`` over every weight
  (range finder, 4 power iterations, chunks of ``--max-memory``), factors kept, nothing written;
- ``dense``: mergekit's ``decompose_delta_weight``: ``torch.linalg.svd((W_t − W_b).float())`` per weight
  and the top ``--rank`` kept. On 2 shared cores a full SVD of an 11008×4096 matrix takes minutes, so
  this runs on ``--dense-per-shape`` weights of each of the three shapes, and its time for the whole
  model is extrapolated by the shape counts (printed as such).

Error, on one weight of each shape: ``‖ΔW_r − P‖_F / ‖P‖_F`` (against the planted change) and
``‖ΔW_r − ΔW‖_F / ‖ΔW‖_F`` (against the stored difference; the dense SVD is the optimum) for both.

Usage::

    python benchmarks/bench_extract.py --threads 2 --layers 2           # ~17 min on 2 loaded cores (the dense SVDs)
    python benchmarks/bench_extract.py --threads 2 --layers 32          # the whole 7B shape (27 GB of files)
    python benchmarks/bench_extract.py --threads 16 --layers 4 --device cuda   # GPU: extract and dense SVDs there
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_finder import LLAMA, AnonPeak, decaying, peak_rss_mib  # noqa: E402


def planted(m: int, n: int, rank: int, norm: float, g: torch.Generator) -> torch.Tensor:
    """``P = U diag(σ) Vᵀ (m, n)`` of rank ``rank``, ``σ_i ∝ i^{-1/2}``, ``‖P‖_F = norm``."""
    U = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    s = torch.arange(1, rank + 1, dtype=torch.float32) ** -0.5
    s *= norm / s.norm()
    return (U * s) @ V.T


def planted_of(w: str, Wb: torch.Tensor, rank: int) -> torch.Tensor:
    """The change ``write_pair`` planted in weight ``w`` (its generator re-drawn from the same seed)."""
    layer, j = int(w.split(".")[2]), list(LLAMA).index(w.split(".", 3)[3].removesuffix(".weight"))
    g = torch.Generator().manual_seed(layer * 10 + j)
    torch.randperm(Wb.shape[0], generator=g), torch.randperm(Wb.shape[1], generator=g)  # write_pair's draws
    return planted(*Wb.shape, rank, 0.1 * float(Wb.float().norm()), g)


def write_pair(folder: Path, layers: int, rank: int) -> list[str]:
    """``folder/base`` and ``folder/tuned``: one bf16 shard per layer each, with their index; the weight names."""
    from safetensors.torch import save_file

    proto = {shape: decaying(*shape)[0] for shape in set(LLAMA.values())}
    names = []
    for sub in ("base", "tuned"):
        (folder / sub).mkdir()
    maps = {"base": {}, "tuned": {}}
    for layer in range(layers):
        base, tuned = {}, {}
        for j, (mod, shape) in enumerate(LLAMA.items()):
            g = torch.Generator().manual_seed(layer * 10 + j)
            P0 = proto[shape]
            W = P0[torch.randperm(shape[0], generator=g)][:, torch.randperm(shape[1], generator=g)].bfloat16()
            name = f"model.layers.{layer}.{mod}.weight"
            base[name] = W.contiguous()
            tuned[name] = (W.float() + planted(*shape, rank, 0.1 * float(W.float().norm()), g)).bfloat16()
        for sub, tensors in (("base", base), ("tuned", tuned)):
            save_file(tensors, str(folder / sub / f"model-{layer:05d}.safetensors"))
            maps[sub].update({n: f"model-{layer:05d}.safetensors" for n in tensors})
        names += list(base)
    for sub in ("base", "tuned"):
        (folder / sub / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[sub]}))
    return names


def _child(kind: str, folder: str, names: list[str], rank: int, threads: int, max_memory: int, planted_rank: int,
           device: str, out) -> None:
    torch.set_num_threads(threads)
    from lora_lens import open_base
    from lora_lens.ops.extract import extract_lora

    anon = AnonPeak()
    base, tuned = open_base(Path(folder) / "base"), open_base(Path(folder) / "tuned")
    t = time.perf_counter()
    if kind == "read":
        for w in names:
            D = tuned.get(w).float()
            D.sub_(base.get(w))
            del D
    elif kind == "lora_lens":
        extract_lora(base, tuned, None, rank=rank, device=device, max_memory=max_memory)
    else:  # dense: mergekit's decompose_delta_weight on the listed weights
        kept = {}
        for w in names:
            D = tuned.get(w).to(device).float() - base.get(w).to(device).float()
            U, S, Vh = torch.linalg.svd(D, full_matrices=False)
            B, A = U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]
            kept[w] = (B.cpu(), A.cpu())
            del D, U, S, Vh
    elapsed, rss, peak = time.perf_counter() - t, peak_rss_mib(), anon.stop()
    errs = {}
    if kind == "dense":  # after the clock: the errors of what the loop kept (float64 references)
        for w, (B, A) in kept.items():
            Wb = base.get(w)
            D = (tuned.get(w).float() - Wb.float()).double()
            errs[w] = rel_errors(B.double() @ A.double(), planted_of(w, Wb, planted_rank).double(), D)
    out.put((elapsed, rss, peak, errs))


def rel_errors(X: torch.Tensor, P: torch.Tensor, D: torch.Tensor) -> tuple[float, float]:
    """``‖X − P‖_F / ‖P‖_F`` and ``‖X − ΔW‖_F / ‖ΔW‖_F``."""
    return float((X - P).norm() / P.norm()), float((X - D).norm() / D.norm())


def run(kind: str, folder: str, names: list[str], args) -> tuple:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kind, folder, names, args.rank, args.threads, args.max_memory,
                                         args.planted, args.device, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        raise SystemExit(f"the {kind!r} run failed (exit {p.exitcode}); its traceback is above")
    return q.get()


def errors(folder: Path, dense_errors: dict, rank: int, planted_rank: int, threads: int) -> None:
    """lora_lens's rank-r errors on the weights the dense loop timed, beside the loop's own (float64 references)."""
    torch.set_num_threads(threads)
    from lora_lens import Compute, open_base
    from lora_lens.ops.extract import ExtractSettings, ExtractTask, extract_task

    base, tuned = open_base(folder / "base"), open_base(folder / "tuned")
    settings = ExtractSettings("rank", rank, compute=Compute(device="cpu"))
    print(f"\nError at rank {rank} (P the planted change, ΔW the stored difference; the dense SVD is ΔW's optimum):")
    print("| weight | shape | lora_lens vs P | dense vs P | lora_lens vs ΔW | dense vs ΔW |")
    print("|---|---|---|---|---|---|")
    for w, (dP, dD) in dense_errors.items():
        shape = tuple(base.info(w).shape)
        # the weight alone through extract's own unit of work (same seed, same numbers as in the whole run)
        (m,) = extract_task(ExtractTask(str(base.path), str(tuned.path), (w,), ("linear",), shape, settings))
        Wb = base.get(w)
        D = (tuned.get(w).float() - Wb.float()).double()
        oP, oD = rel_errors(m.B.double() @ m.A.double(), planted_of(w, Wb, planted_rank).double(), D)
        print(f"| {w} | {shape[0]}x{shape[1]} | {oP:.3e} | {dP:.3e} | {oD:.5e} | {dD:.5e} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2, help="Llama-7B-shaped layers (32: the whole model)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--planted", type=int, default=64, help="rank of the planted change")
    ap.add_argument("--dense-per-shape", type=int, default=1, help="weights of each shape the dense loop times")
    ap.add_argument("--max-memory", type=int, default=1 << 30, help="extract's chunk budget (bytes)")
    ap.add_argument("--dir", help="where the pair is written (default: the system's temp dir)")
    ap.add_argument("--no-errors", action="store_true", help="skip the error table")
    ap.add_argument("--device", default="cpu", help="where extract and the dense SVDs run (cuda: both on the GPU, "
                    "and lora_lens once more on the CPU for the GPU-vs-CPU ratio)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        names = write_pair(Path(tmp), args.layers, args.planted)
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / 2 ** 30
        print(f"torch {torch.__version__}, {args.threads} CPU thread(s); {args.layers} Llama-7B-shaped layers, "
              f"{len(names)} weights, base + tuned {size:.1f} GiB bf16 (written in {time.perf_counter() - t0:.0f} s); "
              f"rank {args.rank}, planted rank {args.planted}, max_memory {args.max_memory / 2 ** 20:.0f} MiB",
              flush=True)
        res = {}
        for kind in ("read", "lora_lens"):
            res[kind] = run(kind, tmp, names, args)
            if kind == "lora_lens" and args.device != "cpu":
                res["lora_lens_cpu"] = run(kind, tmp, names, argparse.Namespace(**{**vars(args), "device": "cpu"}))
            print(f"  {kind:<10}{res[kind][0]:>8.1f} s   peak RSS {res[kind][1]:>7.0f} MiB (mapped file pages "
                  f"included), anonymous {res[kind][2]:>7.0f} MiB", flush=True)
        by_shape: dict[tuple, list[str]] = {}
        for w in names:
            mod = w.split(".", 3)[3].removesuffix(".weight")
            by_shape.setdefault(LLAMA[mod], []).append(w)
        subset = [w for ws in by_shape.values() for w in ws[: args.dense_per_shape]]
        # per weight of each shape, timed separately, then scaled by how many weights of that shape there are
        dense_total, dense_peak, dense_errors = 0.0, 0.0, {}
        for shape, ws in by_shape.items():
            part = [w for w in subset if w in ws]
            t, rss, anon, errs = run("dense", tmp, part, args)
            dense_errors.update(errs)
            dense_total += t / len(part) * len(ws)
            dense_peak = max(dense_peak, anon)
            print(f"  dense     {t / len(part):>8.1f} s per {shape[0]}x{shape[1]} weight ({len(part)} timed, "
                  f"{len(ws)} in the model)   anonymous {anon:>7.0f} MiB", flush=True)
        t_read, t_ll = res["read"][0], res["lora_lens"][0]
        pair = max(2 * 2 * math.prod(s) for s in by_shape) / 2 ** 20
        print(f"\nSummary ({args.layers} layers, {len(names)} weights, rank {args.rank}):")
        print("| method | time s | vs read floor | speed-up vs dense | peak anonymous MiB |")
        print("|---|---|---|---|---|")
        print(f"| read floor | {t_read:.1f} | 1.0x | | {res['read'][2]:.0f} |")
        print(f"| lora_lens extract | {t_ll:.1f} | {t_ll / t_read:.1f}x | {dense_total / t_ll:.1f}x "
              f"| {res['lora_lens'][2]:.0f} |")
        print(f"| dense SVD loop (extrapolated from {len(subset)} weights) | {dense_total:.0f} | "
              f"{dense_total / t_read:.0f}x | 1.0x | {dense_peak:.0f} |")
        if "lora_lens_cpu" in res:
            t_cpu = res["lora_lens_cpu"][0]
            print(f"| lora_lens extract on the CPU ({args.threads} threads) | {t_cpu:.1f} | {t_cpu / t_read:.1f}x | "
                  f"{dense_total / t_cpu:.1f}x (dense on {args.device}) | {res['lora_lens_cpu'][2]:.0f} |")
            print(f"lora_lens extract, {args.device} vs CPU: {t_cpu / t_ll:.1f}x")
        print(f"lora_lens peak anonymous memory vs its budget: chunk {args.max_memory / 2 ** 20:.0f} MiB + one bf16 "
              f"weight pair {pair:.0f} MiB", flush=True)
        if not args.no_errors:
            errors(Path(tmp), dense_errors, args.rank, args.planted, args.threads)
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
