"""The training loop: one function, read top to bottom.

AdamW over the trainable adapter tensors, a linear learning-rate schedule with
warm-up, gradient clipping, a held-out loss before and after. The methods hook
in at three marked places: Chain of LoRA at its knots, LoRA-SP around the
optimizer step, and Chain of LoRA's final merge. Logging goes through an
injected ``log(record: dict)`` and progress through ``progress(step, steps, loss)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import NonFiniteError
from ..jsonable import fields_dict
from .config import TrainConfig
from .masks import UpdateMasks
from .memory import PeakMemory
from .setup import Adapted
from .tasks import ClassifyTask, LMTask, to_device

Log = Callable[[dict], None]
Progress = Callable[[int, int, float], None]


@dataclass(eq=False)
class Run:
    """Everything one training run holds; the only stateful object of the trainer.

    ``links`` (Chain of LoRA): one ``{path: (A (r, n), B (m, r))}`` per link
    already merged into the base weights, each with the layer's scaling.
    """

    model: nn.Module
    adapted: Adapted
    task: LMTask | ClassifyTask
    config: TrainConfig
    device: torch.device
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    masks: UpdateMasks | None = None
    knots: tuple[int, ...] = ()
    links: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def autocast(self):
        """Forward and loss in bfloat16 when asked; the weights (and so the optimizer) stay float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.train_dtype == "bfloat16")

    def head_parameters(self) -> int:
        """Entries of the task's head (trained in full; part of the trainable count)."""
        head = self.task.head
        if head is None:
            return 0
        return sum(p.numel() for path in head.paths for p in self.model.get_submodule(path).parameters()
                   if p.requires_grad)

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, allocated)``: LoRA-SP's masked entries are allocated but not trainable."""
        allocated = sum(p.numel() for p in self.trainable())
        return (allocated - self.masks.masked if self.masks else allocated), allocated


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What a run gives back. ``wall_time_s`` covers the whole of :func:`fit` (evaluations
    included); ``train_time_s`` only the training steps, over which ``tokens_per_s`` counts
    training tokens (classify: real tokens, padding excluded). ``eval_curve``: ``[(step, eval
    loss)]`` (step 0 is before training); ``eval_metrics``: the final held-out metrics (classify:
    loss, accuracy, macro_f1). ``peak_memory_bytes``: see :mod:`.memory` (``peak_memory_kind``)."""

    method: str
    losses: list[float]
    eval_loss: float | None
    eval_loss_before: float | None
    trainable_parameters: int
    allocated_parameters: int
    wall_time_s: float
    tokens_per_s: float
    steps: int
    tokens: int
    knots: tuple[int, ...] = ()
    output: Path | None = None
    model: nn.Module | None = field(default=None, repr=False)
    task: str = "lm"
    eval_curve: list[tuple[int, float]] = field(default_factory=list)
    eval_metrics: dict | None = None
    train_time_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""
    train_dtype: str = "float32"  # float32, or bfloat16 = autocast with float32 master weights
    head_parameters: int = 0

    @property
    def eval_accuracy(self) -> float | None:
        return (self.eval_metrics or {}).get("accuracy")

    @property
    def eval_macro_f1(self) -> float | None:
        return (self.eval_metrics or {}).get("macro_f1")

    @property
    def time_per_step_s(self) -> float:
        return self.train_time_s / max(self.steps, 1)

    def curves(self) -> dict:
        """The run as ``lora_lens.report``'s loss-curve mapping: train loss per step, eval loss before
        (step 0) and after (last step), Chain-of-LoRA knots."""
        d = {"train_steps": list(range(1, len(self.losses) + 1)), "train_loss": list(self.losses),
             "knots": list(self.knots)}
        if self.eval_curve:
            d.update(eval_steps=[s for s, _ in self.eval_curve], eval_loss=[v for _, v in self.eval_curve])
        return d

    def to_dict(self) -> dict:
        # reshaped: the model stays out; the derived numbers (accuracy, F1, time per step) go in
        return {**fields_dict(self, exclude=("model",)), "eval_accuracy": self.eval_accuracy,
                "eval_macro_f1": self.eval_macro_f1, "time_per_step_s": self.time_per_step_s}


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``w`` steps, then linear decay towards 0 at ``steps``.

    ``lr · (t + 1) / w`` for ``t < w``, else ``lr · (S − t) / (S − w)``: no step
    runs at lr 0. One schedule for the whole run, across Chain-of-LoRA knots.
    """
    w, S = cfg.warmup, cfg.steps
    if step < w:
        return cfg.lr * (step + 1) / w
    return cfg.lr * (S - step) / (S - w)


def evaluate(run: Run) -> dict | None:
    """The task's held-out metrics (always with ``"loss"``), or None without held-out data."""
    was_training = run.model.training
    run.model.eval()
    metrics = run.task.evaluate(run.model, run.device, 4 * run.config.batch_size, run.autocast)
    run.model.train(was_training)
    return metrics


@torch.no_grad()
def merge_link(run: Run) -> None:
    """Chain of LoRA: ``W0 ← W0 + s · B A`` in every layer, and remember the link."""
    run.links.append({p: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for p, l in run.adapted.layers.items()})
    for layer in run.adapted.layers.values():
        layer.merge_()


def start_new_link(run: Run) -> None:
    """Chain of LoRA knot: merge the current link, start a fresh one (``B = 0``, new Kaiming ``A``)
    and forget the adapter's optimizer state (moments and step counts) (docs/maths.md §7)."""
    merge_link(run)
    for layer in run.adapted.layers.values():
        layer.reset(run.generator)
        for p in layer.parameters():
            run.optimizer.state.pop(p, None)  # the head (classify) is one model across links: it keeps its moments


def finish_chain(run: Run) -> None:
    """Merge the last link; the layers then add nothing (``B = 0``) and the base holds the whole chain."""
    merge_link(run)
    with torch.no_grad():
        for layer in run.adapted.layers.values():
            layer.lora_B.zero_()


def fit(run: Run, log: Log | None = None, progress: Progress | None = None) -> TrainResult:
    """Train ``run`` for ``config.steps`` steps and return the losses and counts (the model ends in eval mode)."""
    cfg, model, opt, masks, task = run.config, run.model, run.optimizer, run.masks, run.task
    log = log or (lambda record: None)
    params = run.trainable()
    trainable, allocated = run.parameter_counts()
    log({"event": "start", "method": cfg.method, "task": task.name, "steps": cfg.steps,
         "trainable_parameters": trainable, "allocated_parameters": allocated, "knots": list(run.knots),
         "data": task.source})
    t_start = time.perf_counter()
    with PeakMemory(run.device) as memory:
        before = evaluate(run)
        eval_curve = [(0, before["loss"])] if before else []
        train_batches = task.batches(cfg.batch_size, cfg.seed)
        losses: list[float] = []
        tokens, last_epoch, train_time = 0, 0, 0.0

        model.train()
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            # Chain of LoRA: at a knot, merge the link into W0 and start a fresh one with a fresh optimizer state.
            if step in run.knots:
                start_new_link(run)
                log({"event": "knot", "step": step, "link": len(run.links) + 1})

            epoch, batch = next(train_batches)
            # LoRA-SP: draw new masks every step or at each new epoch, if asked.
            if masks and ((masks.settings.resample == "step" and step > 0)
                          or (masks.settings.resample == "epoch" and epoch != last_epoch)):
                masks.sample()
                log({"event": "resample", "step": step, "unmasked": masks.unmasked})
            last_epoch = epoch

            lr = learning_rate(step, cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = to_device(batch, run.device)
            with run.autocast():
                loss = task.loss(model, batch)
            if not bool(torch.isfinite(loss)):
                raise NonFiniteError(
                    f"training diverged at step {step}: the loss is {loss.item()}; nothing was written. "
                    "Lower --lr, keep --max-grad-norm > 0, or check the data."
                )
            loss.backward()
            if masks:
                masks.mask_grads()  # frozen entries get no gradient ...
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()  # ... and MaskedAdamW leaves them, their moments and step counts alone
            opt.zero_grad(set_to_none=True)

            losses.append(loss.item())
            tokens += task.tokens(batch)
            train_time += time.perf_counter() - t_step
            log({"event": "step", "step": step + 1, "loss": losses[-1], "lr": lr})
            if progress:
                progress(step + 1, cfg.steps, losses[-1])
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps and before:
                eval_curve.append((step + 1, evaluate(run)["loss"]))
                log({"event": "eval", "step": step + 1, "eval_loss": eval_curve[-1][1]})

        # Chain of LoRA: the last link is merged too, so inference costs what a plain model costs.
        if cfg.method == "chain":
            finish_chain(run)
        after = evaluate(run)
    if after:
        eval_curve.append((cfg.steps, after["loss"]))
    model.eval()  # trained: hand it back ready for inference
    trainable, allocated = run.parameter_counts()
    result = TrainResult(
        method=cfg.method, losses=losses, eval_loss=after["loss"] if after else None,
        eval_loss_before=before["loss"] if before else None,
        trainable_parameters=trainable, allocated_parameters=allocated,
        wall_time_s=time.perf_counter() - t_start, tokens_per_s=tokens / max(train_time, 1e-9),
        steps=cfg.steps, tokens=tokens, knots=run.knots, model=model, task=task.name, eval_curve=eval_curve,
        eval_metrics=after, train_time_s=train_time, peak_memory_bytes=memory.peak,
        peak_memory_kind=memory.kind, train_dtype=cfg.train_dtype, head_parameters=run.head_parameters(),
    )
    log({"event": "end", **result.to_dict()})
    return result
