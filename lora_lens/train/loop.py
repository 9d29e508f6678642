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
from .config import TrainConfig
from .data import TokenData, batches
from .masks import UpdateMasks
from .models import lm_loss
from .setup import Adapted

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
    data: TokenData
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

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, allocated)``: LoRA-SP's masked entries are allocated but not trainable."""
        allocated = sum(p.numel() for p in self.trainable())
        return (allocated - self.masks.masked if self.masks else allocated), allocated


@dataclass(frozen=True, eq=False)
class TrainResult:
    """What a run gives back. ``wall_time_s`` covers the whole of :func:`fit` (evaluations
    included); ``tokens_per_s`` counts training tokens over the time of the training steps."""

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

    def curves(self) -> dict:
        """The run as ``lora_lens.report``'s loss-curve mapping: train loss per step, eval loss before
        (step 0) and after (last step), Chain-of-LoRA knots."""
        d = {"train_steps": list(range(1, len(self.losses) + 1)), "train_loss": list(self.losses),
             "knots": list(self.knots)}
        if self.eval_loss is not None:
            d.update(eval_steps=[0, self.steps], eval_loss=[self.eval_loss_before, self.eval_loss])
        return d

    def to_dict(self) -> dict:
        return {
            "method": self.method, "losses": self.losses, "eval_loss": self.eval_loss,
            "eval_loss_before": self.eval_loss_before, "trainable_parameters": self.trainable_parameters,
            "allocated_parameters": self.allocated_parameters, "wall_time_s": self.wall_time_s,
            "tokens_per_s": self.tokens_per_s, "steps": self.steps, "tokens": self.tokens,
            "knots": list(self.knots), "output": str(self.output) if self.output else None,
        }


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``w`` steps, then linear decay towards 0 at ``steps``.

    ``lr · (t + 1) / w`` for ``t < w``, else ``lr · (S − t) / (S − w)``: no step
    runs at lr 0. One schedule for the whole run, across Chain-of-LoRA knots.
    """
    w, S = cfg.warmup, cfg.steps
    if step < w:
        return cfg.lr * (step + 1) / w
    return cfg.lr * (S - step) / (S - w)


@torch.no_grad()
def evaluate(run: Run) -> float | None:
    """Mean next-token loss over the held-out blocks (token-weighted), or None without any."""
    held = run.data.eval
    if held.shape[0] == 0:
        return None
    was_training = run.model.training
    run.model.eval()
    total, count = 0.0, 0
    step = 4 * run.config.batch_size
    for lo in range(0, held.shape[0], step):
        block = held[lo: lo + step].to(run.device)
        n = block[:, 1:].numel()
        total += float(lm_loss(run.model, block)) * n
        count += n
    run.model.train(was_training)
    return total / count


@torch.no_grad()
def merge_link(run: Run) -> None:
    """Chain of LoRA: ``W0 ← W0 + s · B A`` in every layer, and remember the link."""
    run.links.append({p: (l.lora_A.detach().clone(), l.lora_B.detach().clone()) for p, l in run.adapted.layers.items()})
    for layer in run.adapted.layers.values():
        layer.merge_()


def start_new_link(run: Run) -> None:
    """Chain of LoRA knot: merge the current link, start a fresh one (``B = 0``, new Kaiming ``A``)
    and forget the optimizer's state (moments and step counts) (docs/maths.md §7)."""
    merge_link(run)
    for layer in run.adapted.layers.values():
        layer.reset(run.generator)
    run.optimizer.state.clear()


def finish_chain(run: Run) -> None:
    """Merge the last link; the layers then add nothing (``B = 0``) and the base holds the whole chain."""
    merge_link(run)
    with torch.no_grad():
        for layer in run.adapted.layers.values():
            layer.lora_B.zero_()


def fit(run: Run, log: Log | None = None, progress: Progress | None = None) -> TrainResult:
    """Train ``run`` for ``config.steps`` steps and return the losses and counts (the model ends in eval mode)."""
    cfg, model, opt, masks = run.config, run.model, run.optimizer, run.masks
    log = log or (lambda record: None)
    params = run.trainable()
    trainable, allocated = run.parameter_counts()
    log({"event": "start", "method": cfg.method, "steps": cfg.steps, "trainable_parameters": trainable,
         "allocated_parameters": allocated, "knots": list(run.knots), "data": run.data.source})
    t_start = time.perf_counter()
    eval_before = evaluate(run)
    train_batches = batches(run.data.train, cfg.batch_size, cfg.seed)
    losses: list[float] = []
    tokens, last_epoch = 0, 0

    model.train()
    t_train = time.perf_counter()
    for step in range(cfg.steps):
        # Chain of LoRA: at a knot, merge the link into W0 and start a fresh one with a fresh optimizer state.
        if step in run.knots:
            start_new_link(run)
            log({"event": "knot", "step": step, "link": len(run.links) + 1})

        epoch, block = next(train_batches)
        # LoRA-SP: draw new masks every step or at each new epoch, if asked.
        if masks and ((masks.settings.resample == "step" and step > 0)
                      or (masks.settings.resample == "epoch" and epoch != last_epoch)):
            masks.sample()
            log({"event": "resample", "step": step, "unmasked": masks.unmasked})
        last_epoch = epoch

        lr = learning_rate(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        block = block.to(run.device, non_blocking=True)
        loss = lm_loss(model, block)
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
        tokens += block[:, 1:].numel()
        log({"event": "step", "step": step + 1, "loss": losses[-1], "lr": lr})
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
    train_time = time.perf_counter() - t_train

    # Chain of LoRA: the last link is merged too, so inference costs what a plain model costs.
    if cfg.method == "chain":
        finish_chain(run)
    eval_after = evaluate(run)
    model.eval()  # trained: hand it back ready for inference
    trainable, allocated = run.parameter_counts()
    result = TrainResult(
        method=cfg.method, losses=losses, eval_loss=eval_after, eval_loss_before=eval_before,
        trainable_parameters=trainable, allocated_parameters=allocated,
        wall_time_s=time.perf_counter() - t_start, tokens_per_s=tokens / max(train_time, 1e-9),
        steps=cfg.steps, tokens=tokens, knots=run.knots, model=model,
    )
    log({"event": "end", **result.to_dict()})
    return result
