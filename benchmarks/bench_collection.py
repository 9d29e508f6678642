"""Collections: time and peak memory against naive references in the same run; print ratios.

Writes N rank-r fp16 PEFT adapters on a Llama-7B-shaped q/v module set
(``--dim`` 4096, ``--layers`` blocks × {q_proj, v_proj}) to a temporary folder, then per N:

- ours: :func:`lora_lens.compare.collection.collection_similarity` in-process
  (φ + shared basis, one module at a time, files read lazily), and with
  ``--workers W`` on a local Dask cluster of W processes;
- read floor: reading every factor of every file once (warm page cache);
- (a) the same φ by a pairwise loop over the factored bases (``U_iᵀ U_j`` for
  every pair: N²/2 small GEMMs) against the one Gram per module, kernels only;
- (b) the naive route of per-pair tools: for each pair and module, materialize
  both ΔW and take their full SVDs (measured on ``--naive-pairs`` pairs of one
  module, extrapolated to N(N−1)/2 pairs × all modules);
- peak memory of the in-process run (a child process per N: resident memory
  sampled every 2 ms, above its level at the start), against one module's
  stacked factors.

    PYTHONPATH=. python benchmarks/bench_collection.py                       # N = 10, 50; 4 blocks
    PYTHONPATH=. python benchmarks/bench_collection.py --n 10,50,200 --layers 32 --workers 2
    PYTHONPATH=. python benchmarks/bench_collection.py --n 50 --profile 15          # where the time goes
    PYTHONPATH=. python benchmarks/bench_collection.py --ranks 16,8,4   # mixed ranks: one φ pass per pair k
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_lens.compare.collection import CollectionSettings, collection_similarity
from lora_lens.io import save_peft_adapter
from lora_lens.io.lazy import index_adapter
from lora_lens.keys import parse_module_path
from lora_lens.types import LoraModule

TYPES = ("self_attn.q_proj", "self_attn.v_proj")


def write_adapters(folder: Path, N: int, layers: int, dim: int, r: int, ranks: list[int] | None = None) -> list[Path]:
    """N adapters in 4 planted groups (so the clusters mean something), fp16; adapter i has rank
    ``ranks[i % len(ranks)]`` when given, else ``r``."""
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{b}.{t}" for b in range(layers) for t in TYPES]
    ranks = ranks or [r]
    rmax = max(ranks)
    groups = [{nm: (torch.linalg.qr(torch.randn(dim, rmax, generator=g))[0],
                    torch.linalg.qr(torch.randn(dim, rmax, generator=g))[0]) for nm in names} for _ in range(4)]
    paths = []
    for i in range(N):
        mods = []
        r = ranks[i % len(ranks)]
        for nm in names:
            U, V = (x[:, :r] for x in groups[i % 4][nm])
            B = U @ torch.randn(r, r, generator=g) + 0.05 * torch.randn(dim, r, generator=g)
            A = torch.randn(r, r, generator=g) @ V.T / dim ** 0.5
            mods.append(LoraModule(nm, parse_module_path(nm), A, B, alpha=2.0 * r, scaling=2.0))
        paths.append(save_peft_adapter(folder / f"a{i:04d}", mods, dtype=torch.float16))
    return paths


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def read_floor(paths) -> float:
    t = time.perf_counter()
    for p in paths:
        ix = index_adapter(p)
        for name in ix.refs:
            m = ix.read(name)
            m.A.float(), m.B.float()
    return time.perf_counter() - t


def kernel_ratio(N: int, dim: int, r: int) -> tuple[float, float]:
    """(a): one module side; φ for all pairs by one Gram vs a loop over pairs; returns (t_gram, t_loop)."""
    U = torch.linalg.qr(torch.randn(N, dim, r))[0]  # (N, d, r)
    X = U.transpose(0, 1).reshape(dim, N * r)

    def gram():
        return ((X.T @ X).reshape(N, r, N, r) ** 2).sum((1, 3)) / r

    def loop():
        out = torch.eye(N)
        for i in range(N):
            for j in range(i + 1, N):
                out[i, j] = out[j, i] = ((U[i].T @ U[j]) ** 2).sum() / r
        return out

    a, t_gram = timed(gram)
    b, t_loop = timed(loop)
    assert torch.allclose(a, b, atol=1e-4)
    return t_gram, t_loop


def naive_pair_time(paths, pairs: int) -> float:
    """(b): seconds per (pair, module): materialize both ΔW, full SVD each, φ of the top-r."""
    ix = [index_adapter(p) for p in paths[: pairs + 1]]
    name = next(iter(ix[0].refs))
    t = time.perf_counter()
    for i in range(pairs):
        Us = []
        for x in (ix[i], ix[i + 1]):
            m = x.read(name)
            dW = m.scaling * (m.B.float() @ m.A.float())  # (m, n)
            Us.append(torch.linalg.svd(dW, full_matrices=False)[0][:, : m.rank])
        ((Us[0].T @ Us[1]) ** 2).sum()
    return (time.perf_counter() - t) / pairs


def child(args) -> None:
    """Run one in-process collection and print its time and peak RSS (a fresh process per N).

    With ``--profile``: cProfile's top functions by own time go to stderr (where the time goes).
    """
    paths = json.loads(Path(args.child).read_text())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler = RssSampler()
    run = lambda: collection_similarity(paths, CollectionSettings(device=args.device))  # noqa: E731
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        _, t = timed(lambda: prof.runcall(run))
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(args.profile)
    else:
        _, t = timed(run)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"t": t, "rss_before_kb": before, "rss_after_kb": after, "peak_growth": sampler.stop()}))


class RssSampler:
    """Peak resident memory above the level at start, sampled every 2 ms from /proc/self/statm (Linux).

    ``ru_maxrss`` alone cannot say it: the import of torch leaves a peak that a smaller run never passes.
    Elsewhere: ``None``.
    """

    def __init__(self):
        import threading

        self.ok = os.path.exists("/proc/self/statm")
        self.base = self.peak = self.rss() if self.ok else 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        if self.ok:
            self.thread.start()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _poll(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def stop(self) -> int | None:
        if not self.ok:
            return None
        self.done.set()
        self.thread.join()
        return max(self.peak, self.rss()) - self.base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="10,50", help="Collection sizes, comma-separated.")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ranks", help="Mixed ranks, comma-separated, cycled over the adapters (default: --rank).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="Also run on a local Dask cluster of this many processes.")
    ap.add_argument("--naive-pairs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="Print the K functions with the most own time (cProfile) of each in-process run.")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    sizes = [int(x) for x in args.n.split(",")]
    modules = 2 * args.layers
    stacked = lambda N: N * 2 * args.dim * args.rank * 4 * 3  # factors + U + V (float32) of one module
    print(f"{modules} modules ({args.layers} blocks × q,v), {args.dim}×{args.dim}, r={args.ranks or args.rank}, "
          "fp16 files; "
          f"threads {args.threads}, device {args.device}")
    with tempfile.TemporaryDirectory() as tmp:
        ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else None
        paths = write_adapters(Path(tmp), max(sizes), args.layers, args.dim, args.rank, ranks)
        t_pair = naive_pair_time(paths, args.naive_pairs)
        print(f"naive (b): {t_pair:.2f} s per pair and module (materialize 2 ΔW + 2 full SVDs)")
        for N in sizes:
            sub = [str(p) for p in paths[:N]]
            lst = Path(tmp) / f"list{N}.json"
            lst.write_text(json.dumps(sub))
            floor = min(read_floor(sub) for _ in range(2))
            cmd = [sys.executable, __file__, "--child", str(lst), "--threads", str(args.threads),
                   "--device", args.device, "--profile", str(args.profile)]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ})
            if args.profile:
                print(proc.stderr)
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            t = res["t"]
            naive = t_pair * N * (N - 1) / 2 * modules
            t_gram, t_loop = kernel_ratio(N, args.dim, args.rank)
            extra_mb = (res["peak_growth"] / 2**20 if res["peak_growth"] is not None
                        else (res["rss_after_kb"] - res["rss_before_kb"]) / 1024)
            print(f"N={N:4d}: ours {t:7.2f} s | read floor {floor:6.2f} s (ours/floor {t / floor:5.1f}×) | "
                  f"naive (b) ≈ {naive:9.0f} s → {naive / t:8.0f}× | φ kernel one Gram {t_gram * 1e3:7.1f} ms vs "
                  f"pair loop {t_loop * 1e3:8.1f} ms → {t_loop / t_gram:5.1f}× | peak RSS growth {extra_mb:7.0f} MB "
                  f"(one module's stacked factors+bases {stacked(N) / 2**20:6.0f} MB)")
            if args.workers:
                from lora_lens.dist import dask_mapper
                with dask_mapper("local", args.workers) as mapper:
                    _, tw = timed(lambda: collection_similarity(sub, CollectionSettings(device=args.device),
                                                                mapper=mapper))
                print(f"        --workers {args.workers}: {tw:7.2f} s ({t / tw:4.2f}× in-process; cluster start "
                      "not counted)")


if __name__ == "__main__":
    main()
