"""Step time of the lora_lens trainer vs PEFT ``get_peft_model`` + a plain torch AdamW loop.

Both train LoRA (r=8, alpha=16, q_proj + v_proj, no dropout) on the same model,
the same batches and the same number of steps, with the same per-step work
(forward, next-token loss, backward, grad-norm clip, AdamW step, zero_grad,
``loss.item()``). Rounds alternate between the two so that load on a shared
machine hits both alike; the median step time per side is reported, and the
ratio lora_lens / PEFT (target ≤ 1.2). Then the step time of each method of
the trainer on the first model, relative to its plain LoRA.

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/bench_train.py [--steps 20] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def models():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = {}
    if (STORIES / "config.json").is_file():
        out["stories260K (real, 0.26M)"] = transformers.AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                   num_key_value_heads=4, vocab_size=2048, max_position_embeddings=256)
    out["tiny Llama from config (4x256, 4.2M)"] = transformers.LlamaForCausalLM(cfg)
    for m in out.values():
        m.config.use_cache = False
    return out


def peft_steps(model, blocks, steps, lr, device) -> float:
    """Seconds per step of PEFT + a plain AdamW loop."""
    import peft

    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])).to(device)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    blocks = blocks.to(device)

    def step(block):
        logits = pm(block[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), block[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step(blocks[:8])  # warm-up step (allocations, kernels), not timed
    t = time.perf_counter()
    for i in range(steps):
        step(blocks[(i * 8) % (blocks.shape[0] - 8):][:8])
    return (time.perf_counter() - t) / steps


def lora_lens_steps(model, seq_len, steps, lr, device, method="lora") -> float:
    """Seconds per step of lora_lens's own loop (``fit``), the first (warm-up) step not timed.

    Times are taken in the injected ``log`` at the end of each step.
    """
    from lora_lens.train import TrainConfig, fit, prepare

    cfg = TrainConfig(method=method, rank=8, alpha=16, targets=("q_proj", "v_proj"), steps=steps + 1, lr=lr,
                      batch_size=8, seq_len=seq_len, eval_fraction=0.0, device=device)
    stamps = []
    fit(prepare(model, cfg), log=lambda rec: stamps.append(time.perf_counter()) if rec["event"] == "step" else None)
    return (stamps[-1] - stamps[0]) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from lora_lens.train.data import synthetic_blocks

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, batch 8 x "
          f"{args.seq_len} tokens, {args.steps} steps per round, {args.rounds} rounds (median)")
    for name, model in models().items():
        vocab = model.config.vocab_size
        blocks = synthetic_blocks(vocab, args.seq_len, n=1024)
        ours, theirs = [], []
        for _ in range(args.rounds):
            theirs.append(peft_steps(model, blocks, args.steps, 1e-3, args.device))
            ours.append(lora_lens_steps(model, args.seq_len, args.steps, 1e-3, args.device))
        o, t = statistics.median(ours), statistics.median(theirs)
        print(f"{name:38s} lora_lens {o * 1e3:7.2f} ms/step   PEFT+AdamW {t * 1e3:7.2f} ms/step   "
              f"ratio {o / t:.3f}")
    model = next(iter(models().values()))
    per_method = {m: [] for m in ("lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain")}
    for _ in range(args.rounds):
        for m in per_method:
            per_method[m].append(lora_lens_steps(model, args.seq_len, args.steps, 1e-3, args.device, m))
    ref = statistics.median(per_method["lora"])
    print("lora_lens methods on the first model: " + ", ".join(
        f"{m} {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / ref:.2f}x)" for m, v in per_method.items()))


if __name__ == "__main__":
    main()
