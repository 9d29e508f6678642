"""Tasks: what a run learns. A task owns its data collation, its head and its metric; methods own only the
adapter parameterization, so every method trains every task through the same loop.

``lm``: next-token prediction on token blocks ``(b, T + 1)`` (:mod:`.data`);
metric: held-out loss (token-weighted mean cross-entropy, nats).

``classify``: sequence classification on labelled examples (:mod:`.labelled`),
batches of ``input_ids`` / ``attention_mask (b, L)`` and ``labels (b,)``;
the model gives logits ``(b, K)``; metrics: held-out loss (mean cross-entropy
per example), accuracy and macro-F1 (scikit-learn's ``f1_score(average="macro")``
over all ``K`` classes, a class never predicted scoring 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .data import TokenData, batches
from .heads import Head
from .labelled import LabelledData, collate, example_batches
from .models import lm_loss

TASKS = ("lm", "classify")

Batch = torch.Tensor | dict[str, torch.Tensor]


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device, non_blocking=True)


@dataclass(frozen=True, eq=False)
class LMTask:
    data: TokenData
    head: Head | None = None  # only head-only trains one on lm

    name = "lm"

    @property
    def source(self) -> str:
        return self.data.source

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[int, Batch]]:
        return batches(self.data.train, batch_size, seed)

    def loss(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, batch)

    def tokens(self, batch: torch.Tensor) -> int:
        return batch[:, 1:].numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, batch_size: int, autocast) -> dict | None:
        """``{"loss"}`` over the held-out blocks, or None without any."""
        held = self.data.eval
        if held.shape[0] == 0:
            return None
        total, count = 0.0, 0
        for lo in range(0, held.shape[0], batch_size):
            block = held[lo: lo + batch_size].to(device)
            with autocast():
                loss = lm_loss(model, block)
            n = block[:, 1:].numel()
            total, count = total + float(loss) * n, count + n
        return {"loss": total / count}


@dataclass(frozen=True, eq=False)
class ClassifyTask:
    data: LabelledData
    head: Head
    bucket: bool = True  # length-bucketed batches (labelled.bucketed_batches); False: uniform random draws

    name = "classify"

    @property
    def source(self) -> str:
        return self.data.source

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[int, Batch]]:
        return example_batches(self.data.train, batch_size, seed, self.head.pad_token_id, bucket=self.bucket)

    def logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """``(b, K)``."""
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device: torch.device, batch_size: int, autocast) -> dict | None:
        """``{"loss", "accuracy", "macro_f1"}`` over the held-out examples, or None without any."""
        held = self.data.eval
        if len(held) == 0:
            return None
        from sklearn.metrics import f1_score  # ~1 s to import: only when there is something to score
        # Sorted by length so each batch pads little; the metrics do not depend on the order.
        order = sorted(range(len(held)), key=lambda i: len(held.ids[i]))
        total, preds, labels = 0.0, [], []
        for lo in range(0, len(order), batch_size):
            batch = to_device(collate(held.subset(order[lo: lo + batch_size]), self.head.pad_token_id), device)
            with autocast():
                logits = self.logits(model, batch).float()  # (b, K)
            total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        p, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
        K = len(self.data.classes)
        return {"loss": total / len(held), "accuracy": float((p == y).mean()),
                "macro_f1": float(f1_score(y, p, labels=list(range(K)), average="macro", zero_division=0))}
