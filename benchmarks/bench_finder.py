"""Base-weight top-k: lora_lens's range finder vs the loop a user would write, at equal accuracy, in one run.

The reference is a plain Python loop of ``torch.svd_lowrank(W.float(),
q=k+16, niter=4)`` over bf16 weights. lora_lens runs
``linalg.randomized_svd(W, k)`` on the whole bf16 stack: the same maths (4
power iterations, q = k + 16; methods.md §1) with CholeskyQR2 between passes
and no ``Qᵀ W`` pass or ``(q, n)`` SVD at the end (lora_lens/randomized.py).

Weights: ``σ_i = i^{-1/2}`` (LLM-like, slowly decaying) with DCT singular
vectors (``bench_randomized.test_matrix``), stored in bf16. bf16 rounding moves
σ_k by ~1e-3, so accuracy is measured against a float64 reference of the bf16
matrices themselves: the same finder in float64 with q = 256 + 128 and 20
power iterations (error < 3e-4 on σ_256, < 1e-9 on σ_≤128 for this spectrum),
on the first ``--check`` matrices of each group.

Printed per group and k: best-of-``--repeats`` times (the CPU is shared, so
single timings are noisy; ``--clock cpu`` times this process's CPU instead of
the wall, steadier with ``--threads 1`` when other jobs share the cores), the ratio, the errors of both (max relative error
of σ_1..σ_{k/2} and of σ_k, ``φ`` of the top-k left subspace against the
reference: 1 = same), and the finder's achieved GEMM rate (flops of its passes
over its whole time) against this machine's measured rates: a square 2048³
product and a product of the finder's own shape ``(m, n) × (n, q)``.

First, the orthonormalization between passes, on the 2048² group at k = 64:
Householder QR (``torch.linalg.qr``), CholeskyQR2 (the default), and
LU-normalized passes (Halko–Martinsson–Tropp; fbpca's choice) with
Householder QR only for the last two passes.

Usage::

    python benchmarks/bench_finder.py --threads 2 --repeats 3
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

from bench_randomized import test_matrix  # noqa: E402
from lora_lens.linalg import phi, randomized_svd  # noqa: E402
from lora_lens.randomized import range_svd, sketches  # noqa: E402

KS = (16, 64, 256)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Smallest wall time of ``repeats`` calls, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = clock()
        out = fn()
        best = min(best, clock() - t)
    return best, out


def gemm_rate(m: int, n: int, q: int, repeats: int) -> float:
    """GFLOP/s of a float32 ``(m, n) × (n, q)`` product on this machine, best of ``repeats``."""
    A, B = torch.randn(m, n), torch.randn(n, q)
    A @ B
    t, _ = best_of(lambda: A @ B, repeats)
    return 2 * m * n * q / t / 1e9


def stack(m: int, n: int, count: int) -> torch.Tensor:
    """``(count, m, n)`` bf16 weights with σ_i = i^{-1/2}, each with its own singular vectors."""
    return torch.stack([test_matrix(m, n, seed=s)[0].bfloat16() for s in range(count)])


def reference(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 top-256 ``(U, S)`` of bf16 matrices ``(c, m, n)``, far more accurate than what is compared."""
    res = randomized_svd(W.double(), max(KS), oversample=128, n_iter=20, seed=123, probes=0)
    return res.U, res.S


def errors(U: torch.Tensor, S: torch.Tensor, Uref: torch.Tensor, Sref: torch.Tensor, k: int) -> tuple[float, ...]:
    """(max rel err σ_≤k/2, rel err σ_k, φ of the top-k left subspace), worst over the checked matrices."""
    rel = ((S[:, :k].double() - Sref[:, :k]) / Sref[:, :k]).abs()
    ph = phi(U[:, :, :k].double(), Uref[:, :, :k])
    return rel[:, : k // 2].max().item(), rel[:, k - 1].max().item(), ph.min().item()


def lu_normalized(W: torch.Tensor, k: int, oversample: int = 16, n_iter: int = 4, seed: int = 0):
    """Top-k by LU-normalized power passes (P L of a pivoted LU), Householder QR for the last two; one matrix."""
    m, n = W.shape
    q = k + oversample
    omega = sketches(1, n, q, 0, seed, W.dtype)[0][0]

    def pl(X):  # X = P L U  →  P L, an (m, q) basis of span X without orthogonality
        LU, piv = torch.linalg.lu_factor(X)
        L = LU.tril(-1) + torch.eye(*LU.shape, dtype=LU.dtype)
        perm = list(range(X.shape[0]))
        for i, p in enumerate(piv.tolist()):  # LAPACK row swaps, applied in order
            perm[i], perm[p - 1] = perm[p - 1], perm[i]
        out = torch.empty_like(L)
        out[perm] = L
        return out

    Q = pl(W @ omega)
    for it in range(n_iter):
        Z = pl(W.T @ Q)
        Q = torch.linalg.qr(W @ Z)[0] if it == n_iter - 1 else pl(W @ Z)
    Z, R = torch.linalg.qr(W.T @ Q)
    Ur, S, Vrh = torch.linalg.svd(R.T)
    return Q @ Ur[:, :k], S[:k], Vrh[:k] @ Z.T


def ortho_variants(W: torch.Tensor, Uref, Sref, repeats: int) -> None:
    k, c = 64, Uref.shape[0]
    print(f"Orthonormalization between passes: {W.shape[0]} bf16 {W.shape[1]}x{W.shape[2]}, k={k}, q={k + 16}, "
          f"4 power iterations (10 passes)")
    print(f"  {'variant':<34}{'time s':>8}{'err σ≤k/2':>11}{'err σ_k':>10}{'φ_U(k)':>9}")
    variants = {
        "Householder QR every pass": lambda: randomized_svd(W, k, householder=True),
        "CholeskyQR2 + fallback (default)": lambda: randomized_svd(W, k),
        "LU passes, Householder last two": lambda: [lu_normalized(w.float(), k) for w in W],
    }
    for name, fn in variants.items():
        t, out = best_of(fn, repeats)
        if isinstance(out, list):  # one (U, S, Vh) per matrix
            out = tuple(torch.stack(t) for t in zip(*out))
        U, S = out[0], out[1]
        e = errors(U[:c], S[:c], Uref, Sref, k)
        print(f"  {name:<34}{t:>8.2f}{e[0]:>11.1e}{e[1]:>10.1e}{e[2]:>9.5f}")
    print()


def compare(W: torch.Tensor, Uref, Sref, repeats: int, square_rate: float, adaptive: float | None) -> list[float]:
    L, m, n = W.shape
    c = Uref.shape[0]
    print(f"{L} bf16 {m}x{n} (accuracy on {c}):")
    print(f"  {'k':>4} {'method':<30}{'time s':>8}{'ratio':>7}{'err σ≤k/2':>11}{'err σ_k':>10}{'φ_U(k)':>9}"
          f"{'passes':>8}{'GF/s':>7}{'% square':>9}{'% shape':>9}")
    ratios = []
    for k in KS:
        q = k + 16

        def loop():
            torch.manual_seed(0)
            return [torch.svd_lowrank(w.float(), q=q, niter=4) for w in W]

        t_loop, t_fin = float("inf"), float("inf")
        for _ in range(repeats):  # interleaved, so both see the same load on a shared machine
            t, out_loop = best_of(loop, 1)
            t_loop = min(t_loop, t)
            t, out_fin = best_of(lambda: randomized_svd(W, k), 1)
            t_fin = min(t_fin, t)
        Ul = torch.stack([o[0] for o in out_loop[:c]])
        Sl = torch.stack([o[1] for o in out_loop[:c]])
        shape_rate = gemm_rate(m, n, q, 3)
        el = errors(Ul, Sl, Uref, Sref, k)
        ef = errors(out_fin.U[:c], out_fin.S[:c], Uref, Sref, k)
        passes = out_fin.passes.double()
        rate = float((passes * 2 * m * n * q).sum() + L * 2 * m * n * 4) / t_fin / 1e9  # + the 4 probe columns
        ratios.append(t_loop / t_fin)
        print(f"  {k:>4} {'svd_lowrank loop, niter=4':<30}{t_loop:>8.2f}{1:>6.2f}x{el[0]:>11.1e}{el[1]:>10.1e}"
              f"{el[2]:>9.5f}{10:>8d}")
        print(f"  {k:>4} {'lora_lens n_iter=4':<30}{t_fin:>8.2f}{t_loop / t_fin:>6.2f}x{ef[0]:>11.1e}{ef[1]:>10.1e}"
              f"{ef[2]:>9.5f}{passes.mean().item():>8.0f}{rate:>7.0f}{100 * rate / square_rate:>8.0f}%"
              f"{100 * rate / shape_rate:>8.0f}%")
        if adaptive is not None:
            t_ad, out_ad = best_of(lambda: randomized_svd(W, k, tol=adaptive), repeats)
            ea = errors(out_ad.U[:c], out_ad.S[:c], Uref, Sref, k)
            print(f"  {k:>4} {f'lora_lens tol={adaptive:g}':<30}{t_ad:>8.2f}{t_loop / t_ad:>6.2f}x{ea[0]:>11.1e}"
                  f"{ea[1]:>10.1e}{ea[2]:>9.5f}{out_ad.passes.double().mean().item():>8.1f}"
                  f"   est. err ≤ {out_ad.error.max().item():.1e}")
        print(f"       (product ({m}, {n}) x ({n}, {q}) alone: {shape_rate:.0f} GF/s)")
    print()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="best-of repeats (interleaved with the reference)")
    ap.add_argument("--count", type=int, default=32, help="2048x2048 weights")
    ap.add_argument("--llama-count", type=int, default=2, help="weights of each Llama-7B shape (4096², 11008x4096)")
    ap.add_argument("--check", type=int, default=2, help="matrices per group checked against float64")
    ap.add_argument("--tol", type=float, default=1e-2, help="adaptive row on the 2048² group (0: skip)")
    ap.add_argument("--groups", default="2048,llama", help="which groups: 2048 and/or llama")
    ap.add_argument("--clock", choices=CLOCK, default="wall",
                    help="wall time, or this process's CPU time (steadier with 1 thread on a loaded, shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global clock
    clock = CLOCK[args.clock]
    t0 = time.perf_counter()
    square = gemm_rate(2048, 2048, 2048, 5)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.clock} clock; float32 GEMM 2048³: "
          f"{square:.0f} GF/s\n")
    groups = ([((2048, 2048), args.count)] if "2048" in args.groups else []) + \
        ([((4096, 4096), args.llama_count), ((11008, 4096), args.llama_count)] if "llama" in args.groups else [])
    ratios = []
    for (m, n), count in groups:
        W = stack(m, n, count)
        c = min(args.check, count)
        Uref, Sref = reference(W[:c])
        if (m, n) == (2048, 2048):
            ortho_variants(W, Uref, Sref, args.repeats)
        adaptive = args.tol if (m, n) == (2048, 2048) and args.tol else None
        ratios += compare(W, Uref, Sref, args.repeats, square, adaptive)
        del W
    print(f"speed-up over the loop at n_iter=4 (same passes, same q): min {min(ratios):.2f}x, max {max(ratios):.2f}x")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
