"""Base-weight top-k: lora_lens's range finder vs the loop a user would write, in one run (ratios).

The reference is a plain Python loop of ``torch.svd_lowrank(W.float(),
q=k+16, niter=4)`` over bf16 weights. lora_lens runs
``linalg.randomized_svd(W, k)`` on the whole bf16 stack: the same maths (4
power iterations, q = k + 16; 10 passes over W) with LU-normalized passes,
CholeskyQR2 where an orthonormal iterate is needed, the passes no check reads
on the bf16 weights as stored (where bf16 products were measured faster than float32 ones, or CUDA
or CUDA; the "half" column counts them) and no ``Qᵀ W`` pass or ``(q, n)``
SVD at the end (lora_lens/randomized.py).

Weights: ``σ_i = i^{-1/2}`` (LLM-like, slowly decaying) with DCT singular
vectors, each matrix its own row/column permutation of one such matrix,
stored in bf16. Accuracy: both methods on the bf16 matrices (a permutation
leaves σ unchanged), against their σ in float64; printed as
``max_i≤k |σ̂_i − σ_i| / σ_1`` and ``|σ̂_k − σ_k| / σ_1``, each the mean over the group.

Printed: the machine's float32 GEMM rate (a square product) and, per group and
k, best-of-``--repeats`` times of both (interleaved, so both see the same load
on a shared machine), the ratio, the errors, and the finder's achieved rate
(flops of its products over its whole time, all counted as float32 products)
as a % of the square GEMM and of a lone float32 product of its own shape
``(m, n) × (n, q)`` (skinny products are bandwidth-bound: that is the rate
float32 passes can reach; half passes take it past 100 %). ``--device cuda``
runs both on the GPU (``--cpu-too`` adds lora_lens on the CPU, for GPU vs CPU). Then variants of the
finder at k = 64 on the 2048² group (orthonormalization, batching, the
``Wᵀ Q`` orientation), and optionally (``--whole-base``) a synthetic
Llama-7B-shaped base written to a temp dir: ``decompose_base`` top-64 vs the
read floor and the loop, each in a fresh process (peak RSS), with and without
prefetch. A summary table comes last.

Usage::

    python benchmarks/bench_finder.py --threads 2                  # default run (a few minutes on 2 cores)
    python benchmarks/bench_finder.py --threads 2 --llama-count 32 --whole-base --layers 32   # the full 7B
    python benchmarks/bench_finder.py --device cuda --cpu-too --whole-base --layers 4        # GPU vs CPU
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.fft import idct  # noqa: E402

import lora_lens.randomized as R  # noqa: E402
from lora_lens.linalg import randomized_svd  # noqa: E402

CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter
DEVICE = torch.device("cpu")
SUMMARY: list[tuple] = []


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Smallest time of ``repeats`` calls (the device synchronized), and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        sync()
        t = clock()
        out = fn()
        sync()
        best = min(best, clock() - t)
    return best, out


def gemm_rate(m: int, n: int, q: int, repeats: int = 3) -> float:
    """GFLOP/s of a float32 ``(m, n) × (n, q)`` product on ``DEVICE``, best of ``repeats``."""
    A, B = torch.randn(m, n, device=DEVICE), torch.randn(n, q, device=DEVICE)
    A @ B
    t, _ = best_of(lambda: A @ B, repeats)
    return 2 * m * n * q / t / 1e9


def decaying(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (m, n)`` float32 with σ_i = i^{-1/2} and DCT singular vectors, and σ (float64)."""
    rng = np.random.default_rng(0)
    k = min(m, n)
    sig = 1.0 / np.sqrt(np.arange(1, k + 1))
    X = np.zeros((m, n))
    X[rng.permutation(m)[:k], rng.permutation(n)[:k]] = sig
    W = idct(idct(X, axis=0, norm="ortho"), axis=1, norm="ortho")
    return torch.from_numpy(W.astype(np.float32)), torch.from_numpy(sig)


def exact_sigma(W: torch.Tensor) -> torch.Tensor:
    """σ of ``W``'s own numbers (a bf16 matrix) in float64, on the CPU: ``√eig(WᵀW)`` of the smaller Gram on
    ``DEVICE`` (4× cheaper than an SVD; the top σ to ``u₆₄ σ₁² / σᵢ²``, far below the errors measured)."""
    X = W.to(DEVICE, torch.float64)
    G = X.mT @ X if X.shape[0] >= X.shape[1] else X @ X.mT
    return torch.linalg.eigvalsh(G).flip(0).clamp_min(0).sqrt().cpu()


def permuted(W: torch.Tensor, count: int, dtype=torch.bfloat16) -> torch.Tensor:
    """``(count, m, n)``: row/column permutations of ``W`` (same σ, other singular vectors), in ``dtype``."""
    g = torch.Generator().manual_seed(1)
    out = torch.empty(count, *W.shape, dtype=dtype)
    for i in range(count):
        out[i] = W[torch.randperm(W.shape[0], generator=g)][:, torch.randperm(W.shape[1], generator=g)]
    return out


def sv_errors(S: torch.Tensor, sig: torch.Tensor, k: int) -> tuple[float, float]:
    """(max_i≤k |σ̂_i − σ_i| / σ_1, |σ̂_k − σ_k| / σ_1)."""
    e = (S[:k].cpu().double() - sig[:k]).abs() / sig[0]
    return e.max().item(), e[k - 1].item()


def mean_errors(S, sig: torch.Tensor, k: int) -> tuple[float, float]:
    """:func:`sv_errors` averaged over the matrices of a group (one sketch's luck varies by up to 10×)."""
    errs = [sv_errors(s, sig, k) for s in S]
    return tuple(sum(e[j] for e in errs) / len(errs) for j in range(2))


def loop(W: torch.Tensor, k: int):
    torch.manual_seed(0)
    return [torch.svd_lowrank(w.float(), q=k + 16, niter=4) for w in W]


def finder_flops(m: int, n: int, q: int, passes: torch.Tensor, probes: int = 4) -> float:
    return float((passes.double() * 2 * min(m, n) * max(m, n) * q).sum() + passes.numel() * 2 * m * n * probes)


def compare(name: str, W: torch.Tensor, sig: torch.Tensor, ks, repeats: int, square: float, cpu_too: bool):
    """``W (L, m, n)`` bf16 on the CPU; ``sig``: the exact σ of every one of its matrices (all permutations)."""
    L, m, n = W.shape
    Wd = W.to(DEVICE)
    print(f"{name}: {L} bf16 {m}x{n} on {DEVICE}")
    print(f"  {'k':>4} {'method':<26}{'time s':>8}{'ratio':>7}{'max err/σ1':>12}{'err σ_k/σ1':>12}{'passes':>7}"
          f"{'half':>5}{'GF/s':>7}{'% square':>9}{'% shape':>9}")
    for k in ks:
        q = k + 16
        t_loop = t_fin = float("inf")
        for _ in range(repeats):  # interleaved: both see the same load
            t, out_loop = best_of(lambda: loop(Wd, k), 1)
            t_loop = min(t_loop, t)
            t, res = best_of(lambda: randomized_svd(Wd, k), 1)
            t_fin = min(t_fin, t)
        el = mean_errors([S for _, S, _ in out_loop], sig, k)
        ef = mean_errors(res.S, sig, k)
        rate = finder_flops(m, n, q, res.passes) / t_fin / 1e9
        shape = gemm_rate(max(m, n), min(m, n), q)
        half = res.half_passes.double().mean().item()
        print(f"  {k:>4} {'svd_lowrank loop niter=4':<26}{t_loop:>8.2f}{1:>6.2f}x{el[0]:>12.1e}{el[1]:>12.1e}{10:>7d}")
        print(f"  {k:>4} {'lora_lens n_iter=4':<26}{t_fin:>8.2f}{t_loop / t_fin:>6.2f}x{ef[0]:>12.1e}{ef[1]:>12.1e}"
              f"{res.passes.double().mean().item():>7.0f}{half:>5.0f}{rate:>7.0f}{100 * rate / square:>8.0f}%"
              f"{100 * rate / shape:>8.0f}%   (lone float32 ({max(m, n)},{min(m, n)})x({min(m, n)},{q}): "
              f"{shape:.0f} GF/s)")
        t_cpu = math.nan
        if cpu_too and DEVICE.type != "cpu":
            t_cpu, _ = best_of(lambda: randomized_svd(W, k), 1)
            print(f"  {k:>4} {'lora_lens on the CPU':<26}{t_cpu:>8.2f}   GPU is {t_cpu / t_fin:.1f}x the CPU "
                  f"({torch.get_num_threads()} threads)")
        SUMMARY.append((f"{L}x {m}x{n}", k, t_loop, t_fin, t_loop / t_fin, el[1], ef[1],
                        100 * rate / square, 100 * rate / shape, t_cpu))
    print()


def variants(W: torch.Tensor, repeats: int, k: int = 64) -> None:
    """The finder's choices at k, one process: each row's time relative to the default."""
    plain_wt = R._wt
    W = W.to(DEVICE)
    rows = {
        "default (LU passes, half passes, one matrix per product on the CPU)": lambda: randomized_svd(W, k),
        "no half passes (every pass in float32)": lambda: randomized_svd(W, k, half_passes=False),
        "CholeskyQR2 every pass": lambda: randomized_svd(W, k, ortho="cholesky"),
        "Householder QR every pass": lambda: randomized_svd(W, k, ortho="householder"),
        "whole stack per product (block=all)": lambda: randomized_svd(W, k, block=W.shape[0]),
        "one matrix per product (block=1)": lambda: randomized_svd(W, k, block=1),
        "Wᵀ Q as W.mT @ Q": lambda: _with_wt(lambda A, Q: A.mT @ Q, lambda: randomized_svd(W, k)),
        "adaptive tol=1e-2": lambda: randomized_svd(W, k, tol=1e-2),
    }
    times = {name: float("inf") for name in rows}
    for _ in range(repeats):  # interleaved
        for name, fn in rows.items():
            times[name] = min(times[name], best_of(fn, 1)[0])
    R._wt = plain_wt
    base = times[next(iter(rows))]  # the default is the first row
    print(f"Variants: {W.shape[0]} bf16 {W.shape[1]}x{W.shape[2]}, k={k} (time relative to the default; >1 = slower)")
    for name, t in times.items():
        print(f"  {name:<68}{t:>8.2f} s{t / base:>7.2f}")
    print()


def _with_wt(wt, fn):
    old, R._wt = R._wt, wt
    try:
        return fn()
    finally:
        R._wt = old


# ------------------------------------------------------------------ whole base (fresh process per measurement)
LLAMA = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
         "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
         "mlp.down_proj": (4096, 11008)}


def write_base(folder: Path, layers: int) -> list[str]:
    """Llama-7B-shaped bf16 safetensors, one shard per layer and the index (σ_i = i^{-1/2} permuted); returns the
    weight names."""
    from safetensors.torch import save_file

    proto = {shape: decaying(*shape)[0] for shape in set(LLAMA.values())}
    names, weight_map = [], {}
    for layer in range(layers):
        tensors = {}
        for j, (mod, shape) in enumerate(LLAMA.items()):
            g = torch.Generator().manual_seed(layer * 10 + j)
            P = proto[shape]
            W = P[torch.randperm(shape[0], generator=g)][:, torch.randperm(shape[1], generator=g)]
            tensors[f"model.layers.{layer}.{mod}.weight"] = W.bfloat16().contiguous()
        names += list(tensors)
        save_file(tensors, str(folder / f"model-{layer:05d}.safetensors"))
        weight_map.update({name: f"model-{layer:05d}.safetensors" for name in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names


def _child(kind: str, folder: str, names: list[str], k: int, threads: int, max_memory: int, device: str,
           out) -> None:
    torch.set_num_threads(threads)
    from lora_lens import open_base
    from lora_lens.decompose import decompose_base

    anon = AnonPeak()
    base = open_base(folder)
    dev = torch.device(device)
    done = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.ones(1, device=dev) @ torch.ones(1, device=dev)  # CUDA context and cuBLAS up before the clock
    t = time.perf_counter()
    if kind == "read":
        for w in names:
            base.get(w).float()
    elif kind == "loop":
        for w in names:
            torch.manual_seed(0)
            torch.svd_lowrank(base.get(w).to(dev).float(), q=k + 16, niter=4)
    else:
        decompose_base(base, names, k=k, randomized=True, prefetch="no prefetch" not in kind, device=device,
                       max_memory=max_memory, half_passes=False if "float32" in kind else None)
    done()
    peak_dev = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else math.nan
    out.put((time.perf_counter() - t, peak_rss_mib(), peak_dev, anon.stop()))


class AnonPeak:
    """Peak anonymous RSS (MiB) of this process, sampled every 10 ms on a thread: the memory the process
    allocated, without the safetensors pages it maps (those count in VmHWM and are page cache)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._done = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def now() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def _run(self) -> None:
        while not self._done.wait(0.01):
            self.peak = max(self.peak, self.now())

    def stop(self) -> float:
        self._done.set()
        self._thread.join()
        return max(self.peak, self.now())


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across the spawn's exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def whole_base(layers: int, k: int, threads: int, max_memory: int, folder: str | None = None) -> None:
    """decompose_base top-k of a synthetic Llama-7B-shaped base vs the read floor and the loop (fresh processes).

    ``folder``: where the base is written (a temp dir under it, removed after); default the system's temp dir.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        t = time.perf_counter()
        names = write_base(Path(tmp), layers)
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2 ** 30
        print(f"Whole base: {layers} Llama-7B-shaped layers, {len(names)} bf16 weights, {size:.1f} GiB "
              f"(written in {time.perf_counter() - t:.0f} s), top-{k} on {DEVICE}, "
              f"max_memory {max_memory / 2 ** 20:.0f} MiB; one chunk of 11008x4096 bf16 weights is at most "
              f"{max_memory / (4 * (11008 * 4096 + 15104 * 4096) * 4) * 11008 * 4096 * 2 / 2 ** 20:.0f} MiB stored",
              flush=True)
        res = {}
        for kind in ("read", "loop", "lora_lens", "lora_lens no prefetch", "lora_lens float32 passes"):
            q = ctx.Queue()
            p = ctx.Process(target=_child, args=(kind, tmp, names, k, threads, max_memory, str(DEVICE), q))
            p.start()
            p.join()
            if p.exitcode != 0:
                raise SystemExit(f"the {kind!r} run failed (exit {p.exitcode}); its traceback is above")
            res[kind] = q.get()
            gpu = f"   peak GPU {res[kind][2]:>7.0f} MiB" if DEVICE.type == "cuda" else ""
            print(f"  {kind:<26}{res[kind][0]:>8.1f} s   peak RSS {res[kind][1]:>7.0f} MiB (mapped file pages "
                  f"included), anonymous {res[kind][3]:>7.0f} MiB{gpu}", flush=True)
        t_read, t_loop, t_ll = res["read"][0], res["loop"][0], res["lora_lens"][0]
        print(f"  lora_lens: {t_ll / t_read:.1f}x the read floor, {t_loop / t_ll:.2f}x faster than the loop; "
              f"prefetch {res['lora_lens no prefetch'][0] / t_ll:.2f}x, half passes "
              f"{res['lora_lens float32 passes'][0] / t_ll:.2f}x\n")
        SUMMARY.append((f"whole base {layers} layers", k, t_loop, t_ll, t_loop / t_ll, math.nan, math.nan,
                        math.nan, math.nan, math.nan))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where both methods run: cpu or cuda")
    ap.add_argument("--cpu-too", action="store_true", help="with --device cuda: lora_lens on the CPU too")
    ap.add_argument("--repeats", type=int, default=2, help="best-of repeats (interleaved with the reference)")
    ap.add_argument("--count", type=int, default=32, help="2048x2048 weights")
    ap.add_argument("--llama-count", type=int, default=4, help="weights of each Llama-7B shape (4096², 11008x4096)")
    ap.add_argument("--ks", default="16,64,256")
    ap.add_argument("--groups", default="2048,llama", help="which groups: 2048 and/or llama")
    ap.add_argument("--no-variants", action="store_true", help="skip the k=64 variants on the 2048² group")
    ap.add_argument("--variant-count", type=int, default=8, help="2048² weights the variants run on")
    ap.add_argument("--whole-base", action="store_true", help="also a synthetic Llama-7B-shaped base from files")
    ap.add_argument("--layers", type=int, default=2, help="layers of the whole base (32: Llama-7B, 13 GB)")
    ap.add_argument("--base-dir", help="where the whole base is written (default: the system's temp dir)")
    ap.add_argument("--max-memory", type=int, default=1 << 30, help="decompose_base's budget for the whole base")
    ap.add_argument("--clock", choices=CLOCK, default="wall",
                    help="wall time, or this process's CPU time (steadier with 1 thread on a loaded, shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock, DEVICE
    clock = CLOCK[args.clock]
    DEVICE = torch.device(args.device)
    ks = [int(x) for x in args.ks.split(",")]
    t0 = time.perf_counter()
    square = gemm_rate(2048, 2048, 2048, 5)
    dev = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    half = R.half_passes_apply(torch.bfloat16, torch.float32, DEVICE)
    import lora_lens.randomized_kernels as K

    timing = K.HALF_TIMING.get("cpu") if DEVICE.type == "cpu" else None
    why = f" (a bf16 pass measured {timing[0] / timing[1]:.2f}× the float32 time)" if timing else ""
    print(f"torch {torch.__version__}, {dev}, {args.threads} CPU thread(s), {args.clock} clock; bf16 passes "
          f"{'on' if half else 'off'}{why}; measured float32 GEMM (2048³): {square:.0f} GF/s\n")
    if "2048" in args.groups:
        W32, _ = decaying(2048, 2048)
        W = permuted(W32, args.count)
        sig = exact_sigma(W[0])
        if not args.no_variants:
            variants(W[: args.variant_count], args.repeats)
        compare("(a)", W, sig, ks, args.repeats, square, args.cpu_too)
        del W
    if "llama" in args.groups:
        for shape in ((4096, 4096), (11008, 4096)):
            W32, _ = decaying(*shape)
            W = permuted(W32, args.llama_count)
            compare("(b)", W, exact_sigma(W[0]), ks, args.repeats, square, args.cpu_too)
            del W
    if args.whole_base:
        whole_base(args.layers, 64, args.threads, args.max_memory, args.base_dir)
    print(f"Summary on {DEVICE} (ratio = loop time / lora_lens time; errors |σ̂_k − σ_k|/σ_1 on the bf16 weights "
          "against a float64 SVD):")
    print("| group | k | loop s | lora_lens s | ratio | loop err σ_k | lora_lens err σ_k | % GEMM | % shape GEMM "
          "| lora_lens CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for g, k, tl, tf, r, el, ef, pg, ps, tc in SUMMARY:
        print(f"| {g} | {k} | {tl:.2f} | {tf:.2f} | {r:.2f}x | {el:.1e} | {ef:.1e} | {pg:.0f} % | {ps:.0f} % "
              f"| {tc:.2f} |")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
