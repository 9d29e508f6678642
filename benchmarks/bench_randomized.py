"""Top-k subspaces of base weights: randomized range finder vs full SVD, and decompose_base's peak memory.

Part 1 — accuracy and time. Weights with an LLM-like, slowly decaying spectrum
``σ_i = i^{-1/2}`` and known singular vectors: ``W = C_mᵀ X C_n`` where ``X``
holds σ at randomly permuted positions and ``C`` are orthonormal DCT-II
matrices (built in O(mn log) by scipy.fft, so the true top-k vectors are
known exactly without a QR of an 11008×4096 Gaussian). A Gaussian sketch makes
the randomized error depend on the singular values only, not on the vectors,
so this loses no generality. For each shape: the full SVD (lora_lens
``linalg.svd``, vectors included), then ``randomized_svd`` for ``oversample``
0/16 × ``n_iter`` 0/2/4: time, max relative error of σ_1..σ_{k/2} and of σ_k,
and φ (LoRA §7 similarity, 1 = same subspace) of the top-k left and right
subspaces against the truth; ``φ_U(k/2⊂k)`` is how much of the leading half
of the estimate lies in the true top-k (σ_k ≈ σ_{k+1} on such a spectrum, so
the last directions of any top-k estimate mix with their neighbours).

Part 2 — peak memory of ``decompose_base`` over a synthetic multi-layer
safetensors checkpoint in a temporary folder, each setting in a fresh
subprocess: anonymous RSS (heap: what lora_lens allocates) sampled every 2 ms,
and the kernel's peak RSS (VmHWM, which also counts the file pages of the
memory-mapped checkpoint, reclaimable page cache), both above the baseline
after opening the checkpoint; plus the time to just read every weight.

Usage::

    python benchmarks/bench_randomized.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.fft import idct  # noqa: E402

from lora_lens.linalg import phi, randomized_svd, svd  # noqa: E402


def test_matrix(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W (m, n)`` float32 with σ_i = i^{-1/2}, and its exact singular triplets (float64, all min(m, n))."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    sig = 1.0 / np.sqrt(np.arange(1, k + 1))
    rows, cols = rng.permutation(m)[:k], rng.permutation(n)[:k]
    X = np.zeros((m, n))
    X[rows, cols] = sig
    W = idct(idct(X, axis=0, norm="ortho"), axis=1, norm="ortho")  # C_mᵀ X C_n
    # U[:, i] = C_mᵀ e_{rows[i]}, V[:, i] = C_nᵀ e_{cols[i]}
    U = idct(np.eye(m)[:, rows], axis=0, norm="ortho")
    V = idct(np.eye(n)[:, cols], axis=0, norm="ortho")
    return torch.from_numpy(W.astype(np.float32)), torch.from_numpy(sig), torch.from_numpy(U), torch.from_numpy(V)


def errors(S, U, Vh, sig, Ut, Vt, k):
    rel = ((S[:k].double() - sig[:k]) / sig[:k]).abs()
    return (rel[: k // 2].max().item(), rel[k - 1].item(), phi(U[:, :k].double(), Ut[:, :k]).item(),
            phi(Vh[:k].T.double(), Vt[:, :k]).item(), phi(U[:, : k // 2].double(), Ut[:, :k]).item())


def part1(shapes, k: int) -> None:
    print(f"Part 1: top-{k} of W with σ_i = i^-1/2 (float32); errors against the exact construction\n")
    head = f"  {'method':<34}{'time s':>8}{'vs full':>9}{'rel err σ≤k/2':>15}{'rel err σ_k':>13}{'φ_U(k)':>9}{'φ_V(k)':>9}{'φ_U(k/2⊂k)':>12}"
    for m, n in shapes:
        W, sig, Ut, Vt = test_matrix(m, n)
        t = time.perf_counter()
        U, S, Vh = svd(W)
        t_full = time.perf_counter() - t
        print(f"{m}x{n}:")
        print(head)
        e = errors(S, U, Vh, sig, Ut, Vt, k)
        print(f"  {'full SVD (linalg.svd, vectors)':<34}{t_full:>8.2f}{1:>8.0f}x{e[0]:>15.1e}{e[1]:>13.1e}{e[2]:>9.5f}{e[3]:>9.5f}{e[4]:>12.5f}")
        del U, S, Vh
        for oversample in (0, 16):
            for n_iter in (0, 2, 4):
                randomized_svd(W[:64, :64], 8)  # keep first-call overheads out
                t = time.perf_counter()
                U, S, Vh = randomized_svd(W, k, oversample=oversample, n_iter=n_iter)
                tr = time.perf_counter() - t
                e = errors(S, U, Vh, sig, Ut, Vt, k)
                name = f"randomized q=k+{oversample}, n_iter={n_iter}"
                print(f"  {name:<34}{tr:>8.2f}{t_full / tr:>8.0f}x{e[0]:>15.1e}{e[1]:>13.1e}{e[2]:>9.5f}{e[3]:>9.5f}{e[4]:>12.5f}")
        print()


# ----- part 2: memory -------------------------------------------------------------------------------------------


def write_checkpoint(folder: Path, layers: int, hidden: int, inter: int) -> int:
    """A Llama-shaped float32 safetensors checkpoint, written one layer at a time; returns its size in bytes."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    weight_map = {}
    for layer in range(layers):
        name = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {f"model.layers.{layer}.{t}.weight": torch.randn(*s, generator=gen) / s[1] ** 0.5
                   for t, s in shapes.items()}
        save_file(tensors, str(folder / name))
        weight_map.update({k: name for k in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                out[key] = int(val.split()[0]) * 1024
    return out


def child(folder: str, max_memory: int | None, k: int, threads: int) -> None:
    """Run in a fresh process: decompose every weight of the checkpoint; print peaks as JSON."""
    torch.set_num_threads(threads)
    from lora_lens import open_base
    from lora_lens.decompose import decompose_base

    base = open_base(folder)
    names = [i.name for i in base.matrices()]
    t = time.perf_counter()
    for w in names:  # the cost of only reading the weights (and checking them for NaN)
        base.get(w)
    t_read = time.perf_counter() - t
    base = open_base(folder)  # fresh handles
    try:  # reset the kernel's peak-RSS counter (Linux ≥ 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    base0 = _status()
    peak = {"anon": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status()["RssAnon"])
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    out = decompose_base(base, names, k=k, device="cpu", max_memory=max_memory)
    t_dec = time.perf_counter() - t
    stop.set()
    th.join()
    end = _status()
    assert len(out) == len(names)
    print(json.dumps({"anon_peak": peak["anon"] - base0["RssAnon"], "hwm": end["VmHWM"] - base0["VmRSS"],
                      "t_read": t_read, "t_dec": t_dec, "n": len(names)}))


def part2(layers: int, hidden: int, inter: int, k: int, budget: int, threads: int) -> None:
    from lora_lens.decompose import chunk_size

    mib = 2 ** 20
    with tempfile.TemporaryDirectory() as tmp:
        size = write_checkpoint(Path(tmp), layers, hidden, inter)
        biggest = inter * hidden * 4
        # decompose_base's own per-matrix estimate (input, workspace, factors) for the biggest shape
        per_item = (3 * inter * hidden + (inter + hidden) * hidden) * 4
        group = 2 * layers * biggest  # gate + up share a shape: the largest shape group
        print(f"Part 2: decompose_base(k={k}, randomized) over a {layers}-layer Llama-shaped checkpoint "
              f"(hidden {hidden}, intermediate {inter}, {7 * layers} float32 weights, {size / mib:.0f} MiB, "
              f"sharded safetensors)")
        print(f"  largest weight {biggest / mib:.1f} MiB; largest shape group {group / mib:.0f} MiB; with "
              f"--max-memory {budget / mib:.0f} MiB a chunk holds {chunk_size(per_item, budget, 2 * layers)} "
              f"such weight(s)\n")
        print(f"  {'max_memory':<14}{'peak anon RSS MiB':>19}{'peak RSS (VmHWM) MiB':>22}{'decompose s':>13}{'read only s':>13}")
        for mm in (None, budget):
            cmd = [sys.executable, __file__, "--child", tmp, "--child-max-memory", str(mm or 0), "--k", str(k),
                   "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            label = "none" if mm is None else f"{mm / mib:.0f} MiB"
            print(f"  {label:<14}{d['anon_peak'] / mib:>19.0f}{d['hwm'] / mib:>22.0f}{d['t_dec']:>13.2f}{d['t_read']:>13.2f}")
        print(f"\n  checkpoint {size / mib:.0f} MiB: with a budget the heap peak follows the chunk, not the checkpoint;"
              f"\n  VmHWM also counts mmap'd file pages (page cache, reclaimable).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--shapes", default="4096x4096,11008x4096", help="comma-separated MxN for part 1")
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic checkpoint (part 2)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--budget", default="64MiB", help="max_memory for the bounded run of part 2")
    ap.add_argument("--skip-part1", action="store_true")
    ap.add_argument("--skip-part2", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-max-memory", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args.child_max_memory or None, args.k, args.threads)
        return
    from cli.common import parse_size

    print(f"torch {torch.__version__}, {args.threads} CPU thread(s)\n")
    t0 = time.perf_counter()
    if not args.skip_part1:
        part1([tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")], args.k)
    if not args.skip_part2:
        part2(args.layers, args.hidden, args.intermediate, args.k, parse_size(args.budget), args.threads)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
