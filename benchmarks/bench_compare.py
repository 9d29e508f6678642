"""Time the compare stage against naive references run in the same process; print ratios.

1. Cross-layer φ of a Llama-7B-shaped adapter (7 projections × L layers, rank r):
   lora_lens (factored batched SVD + one Gram product per module type) vs the
   naive route (materialize ΔW, full SVD, per layer). The naive time is measured
   on one module of each shape and extrapolated to all modules; the singular
   values of those modules are checked against ours.
2. Intruder dimensions: one batched SVD of [W0; W0 + ΔW] per shape group vs a
   per-module loop (same maths), on smaller weights.

    PYTHONPATH=. python benchmarks/bench_compare.py --threads 2
    PYTHONPATH=. python benchmarks/bench_compare.py --dim 1024 --ffn 2752 --layers 8   # quick
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lora_lens.compare import layer_similarity
from lora_lens.compare.intruders import max_cosines, merged_svd
from lora_lens.keys import parse_module_path
from lora_lens.types import Adapter, LoraModule, LoraSettings

PROJ = {"self_attn.q_proj": "dd", "self_attn.k_proj": "dd", "self_attn.v_proj": "dd", "self_attn.o_proj": "dd",
        "mlp.gate_proj": "fd", "mlp.up_proj": "fd", "mlp.down_proj": "df"}


def make_adapter(layers: int, dim: int, ffn: int, r: int) -> Adapter:
    gen = torch.Generator().manual_seed(0)
    size = {"d": dim, "f": ffn}
    mods = []
    for i in range(layers):
        for name, (mo, ni) in PROJ.items():
            path = f"model.layers.{i}.{name}"
            m, n = size[mo], size[ni]
            mods.append(LoraModule(path, parse_module_path(path), torch.randn(r, n, generator=gen) / n ** 0.5,
                                   torch.randn(m, r, generator=gen) / r ** 0.5, alpha=2.0 * r, scaling=2.0))
    return Adapter(Path("bench"), LoraSettings(r, 2.0 * r), tuple(mods))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_similarity(args) -> None:
    ad = make_adapter(args.layers, args.dim, args.ffn, args.rank)
    res, t_ours = timed(lambda: layer_similarity(ad, device="cpu"))
    # naive: materialize ΔW, full SVD, keep top-r; one module per shape, extrapolated
    per_shape, checked = {}, []
    for m in ad:
        if m.shape in per_shape:
            continue
        (U, S, _), t = timed(lambda: torch.linalg.svd(m.delta(torch.float32), full_matrices=False))
        per_shape[m.shape] = t
        from lora_lens.linalg import factored_svd
        S_ours = factored_svd(m.B, m.A, m.scaling)[1]
        checked.append(float(((S[: m.rank] - S_ours) / S_ours).abs().max()))
    t_naive = sum(per_shape[m.shape] for m in ad)
    print(f"[similarity] {len(ad)} modules ({args.layers} layers × 7 projections, d={args.dim}, ffn={args.ffn}, "
          f"r={args.rank}), {len(res.grids)} L×L grids")
    print(f"  lora_lens layer_similarity (factored SVD + φ grids + baselines): {t_ours:.2f} s")
    print(f"  naive materialize + full SVD per module: {t_naive:.1f} s (extrapolated from {len(per_shape)} "
          f"modules: {', '.join(f'{m}x{n} {t:.2f} s' for (m, n), t in per_shape.items())})")
    print(f"  ratio naive / lora_lens: {t_naive / t_ours:.0f}x; max relative σ error vs naive: {max(checked):.1e}")


def bench_intruders(args) -> None:
    gen = torch.Generator().manual_seed(1)
    L, d, r = args.intruder_layers, args.intruder_dim, args.rank
    W0 = torch.randn(L, d, d, generator=gen) / d ** 0.5
    dW = torch.randn(L, d, r, generator=gen) @ torch.randn(L, r, d, generator=gen) / d
    (X, Y, _), t_batched = timed(lambda: merged_svd(W0, dW))
    m_b = max_cosines(X, Y[..., :10])

    def looped():
        return torch.stack([max_cosines(torch.linalg.svd(W0[i])[0], torch.linalg.svd(W0[i] + dW[i])[0][:, :10])
                            for i in range(L)])
    m_l, t_looped = timed(looped)
    print(f"[intruders] {L} modules of {d}x{d}: batched {t_batched:.2f} s, per-module loop {t_looped:.2f} s, "
          f"ratio {t_looped / t_batched:.2f}x; max |Δ m_j| {float((m_b - m_l).abs().max()):.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--intruder-layers", type=int, default=8)
    p.add_argument("--intruder-dim", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    bench_similarity(args)
    bench_intruders(args)


if __name__ == "__main__":
    main()
