"""A plain PEFT + transformers classification loop: the reference the trainer's classify defaults are held to.

It shares nothing with lora_lens.train: AutoModelForSequenceClassification, peft.get_peft_model with
LoraConfig(task_type="SEQ_CLS"), torch AdamW with a linear warm-up then linear decay, random batches padded to
their longest example. Same data files as ``lora-lens train --data TRAIN --eval-data EVAL``, so both are scored
on the same held-out examples.

    python benchmarks/peft_classify_reference.py --base MINILM --data train.jsonl --eval-data eval.jsonl \
        --steps 150 --lr 1e-3 --batch-size 16 --max-length 128 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import torch


def read(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--eval-data", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of steps")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default="query,value")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = read(a.data)
    eval_texts, eval_labels = read(a.eval_data)
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    tok = AutoTokenizer.from_pretrained(a.base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(a.base, num_labels=len(classes), local_files_only=True)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=a.rank, lora_alpha=a.alpha,
                                             target_modules=a.targets.split(",")))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    warm = round(a.warmup * a.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (a.steps - s) / max(1, a.steps - warm)))
    g = torch.Generator().manual_seed(a.seed)
    y = torch.tensor([index[c] for c in labels])
    order = torch.randperm(len(texts), generator=g).tolist()
    t0, pos = time.perf_counter(), 0
    model.train()
    for step in range(a.steps):
        if pos + a.batch_size > len(order):
            order, pos = torch.randperm(len(texts), generator=g).tolist(), 0
        idx = order[pos: pos + a.batch_size]
        pos += a.batch_size
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=a.max_length,
                  return_tensors="pt")
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    train_s = time.perf_counter() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for lo in range(0, len(eval_texts), 64):
            enc = tok(eval_texts[lo: lo + 64], padding=True, truncation=True, max_length=a.max_length,
                      return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([index[c] for c in eval_labels[lo: lo + 64]])).sum())
    print(json.dumps({"reference": "peft+transformers", "steps": a.steps, "lr": a.lr, "batch_size": a.batch_size,
                      "seed": a.seed, "eval_accuracy": correct / len(eval_texts), "train_s": round(train_s, 1)}))


if __name__ == "__main__":
    main()
