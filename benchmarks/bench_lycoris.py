"""LoKr / LoHa spectra on an SDXL-sized LyCORIS file: factored (lora_lens) vs materialize ΔW + SVD.

The file is built in a temporary folder: the 70 transformer blocks of SDXL's
UNet (down_blocks.1/.2, mid_block, up_blocks.0/.1), each with attn1 q/k/v/out,
attn2 q/k/v/out (k/v read the 2048-wide text embedding) and the feed-forward
``ff.net.0.proj`` / ``ff.net.2`` = 700 modules, under kohya names, as LoKr
(``lokr_w1`` full (a₁, b₁) from LyCORIS's near-√ factorization, ``lokr_w2_a/_b``
rank 8) or LoHa (rank 8, effective rank 64). Timed in one process:

- lora_lens: read the file (the factored rewrite included) and
  ``adapter_spectra`` of every module, float32;
- the naive route (what kohya's resize or a materializing tool does): form
  ``ΔW = s·kron(W₁, W₂)`` or ``s·(B₁A₁)⊙(B₂A₂)`` and ``torch.linalg.svdvals``;
  timed on ONE module of each shape and extrapolated to all modules (the
  output says so);
- accuracy: max relative difference of the top-8 singular values, lora_lens
  (float32) vs float64 SVD of the materialized ΔW, one module per shape;
- memory: the bytes the read factors hold (stored dtype) against the same
  factors in float64 (what the reader held before), and the process's peak
  RSS after the read.

``--dtype float16`` writes the file in half precision, as most SDXL files
are; ``--read-only`` stops after the read and its memory.

Usage::

    python benchmarks/bench_lycoris.py --kind lokr --threads 2
    python benchmarks/bench_lycoris.py --kind loha --threads 2
    python benchmarks/bench_lycoris.py --kind lokr --dtype float16 --read-only
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lora_lens.io import load_adapter  # noqa: E402
from lora_lens.keys import kohya_stem  # noqa: E402
from lora_lens.spectra import adapter_spectra  # noqa: E402

#: (stage path, transformer blocks per attention, attentions, width) of SDXL's UNet.
SDXL = [("down_blocks.1", 2, 2, 640), ("down_blocks.2", 10, 2, 1280), ("mid_block", 10, 1, 1280),
        ("up_blocks.0", 10, 3, 1280), ("up_blocks.1", 2, 3, 640)]
TEXT = 2048


def modules() -> list[tuple[str, int, int]]:
    """``(diffusers path, m, n)`` of every targeted Linear."""
    out = []
    for stage, tbs, attns, d in SDXL:
        for a in range(attns):
            for t in range(tbs):
                p = f"unet.{stage}.attentions.{a}.transformer_blocks.{t}"
                out += [(f"{p}.attn1.{x}", d, d) for x in ("to_q", "to_k", "to_v", "to_out.0")]
                out += [(f"{p}.attn2.to_q", d, d), (f"{p}.attn2.to_k", d, TEXT), (f"{p}.attn2.to_v", d, TEXT),
                        (f"{p}.attn2.to_out.0", d, d)]
                out += [(f"{p}.ff.net.0.proj", 8 * d, d), (f"{p}.ff.net.2", d, 4 * d)]
    return out


def near_sqrt(n: int) -> tuple[int, int]:
    """LyCORIS-style factorization ``n = a·b`` with a ≤ b as close as possible."""
    a = max(d for d in range(1, int(math.isqrt(n)) + 1) if n % d == 0)
    return a, n // a


def build(kind: str, folder: Path, rank: int = 8, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for path, m, n in modules():
        k = kohya_stem(path)
        if kind == "lokr":
            (am, bm), (an, bn) = near_sqrt(m), near_sqrt(n)
            t[f"{k}.lokr_w1"] = torch.randn(am, an, generator=g)
            t[f"{k}.lokr_w2_a"] = torch.randn(bm, rank, generator=g) / math.sqrt(rank)
            t[f"{k}.lokr_w2_b"] = torch.randn(rank, bn, generator=g) / math.sqrt(bn)
        else:
            for i in "12":
                t[f"{k}.hada_w{i}_a"] = torch.randn(m, rank, generator=g) / math.sqrt(rank)
                t[f"{k}.hada_w{i}_b"] = torch.randn(rank, n, generator=g) / math.sqrt(n)
        t[f"{k}.alpha"] = torch.tensor(float(rank))
    t = {k: v.to(dtype) if v.numel() > 1 else v for k, v in t.items()}
    f = folder / f"sdxl_{kind}.safetensors"
    save_file(t, f)
    return f


def dense(module) -> torch.Tensor:
    """What a materializing tool forms: ΔW from the factors (float32)."""
    return module.scaling * (module.B.float() @ module.A.float())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", choices=["lokr", "loha"], default="lokr")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--read-only", action="store_true", help="Stop after the read and its memory.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        f = build(args.kind, Path(tmp), dtype=getattr(torch, args.dtype))
        t0 = time.perf_counter()
        adapter = load_adapter(f)
        t_read = time.perf_counter() - t0
        held = adapter.num_bytes
        as_f64 = sum(8 * (m.A.numel() + m.B.numel()) for m in adapter)
        print(f"read {f.stat().st_size / 2**20:.1f} MiB {args.dtype} file in {t_read:.2f} s: factors hold "
              f"{held / 2**30:.2f} GiB ({adapter.modules[0].dtype}); the same in float64 {as_f64 / 2**30:.2f} GiB "
              f"({as_f64 / held:.1f}x); peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
        if args.read_only:
            return
        t0 = time.perf_counter()
        sp = adapter_spectra(adapter, device="cpu", dtype="float32")
        t_spec = time.perf_counter() - t0
    shapes: dict[tuple[int, int], list] = {}
    for m in adapter:
        shapes.setdefault(m.shape, []).append(m)
    sv = {r.name: r.singular_values for r in sp.layers}
    naive, worst = 0.0, 0.0
    for shape, mods in shapes.items():
        m = mods[0]
        t0 = time.perf_counter()
        torch.linalg.svdvals(dense(m))
        naive += (time.perf_counter() - t0) * len(mods)
        ref = torch.linalg.svdvals(m.scaling * (m.B.double() @ m.A.double()))[:8]
        worst = max(worst, float(((sv[m.name][:8].double() - ref).abs() / ref[0]).max()))
    ours = t_read + t_spec
    print(f"SDXL UNet {args.kind}: {len(adapter)} modules, {len(shapes)} shapes, effective ranks "
          f"{sorted({m.rank for m in adapter})}, {args.threads} thread(s)")
    print(f"lora_lens read + factored rewrite: {t_read:.2f} s; adapter_spectra: {t_spec:.2f} s; total {ours:.2f} s")
    print(f"naive materialize + svdvals: {naive:.1f} s (one module per shape timed, extrapolated to all)")
    print(f"ratio naive / lora_lens: {naive / ours:.1f}x")
    print(f"top-8 singular values, float32 factored vs float64 dense SVD: max relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
