"""``train(...)``: the trainer's one public entry point, and ``prepare`` for callers that drive ``fit`` themselves."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..compute import resolve_device
from ..io import check_destination
from ..io.atomic import register_input
from .config import TrainConfig, resolve_train_dtype
from ..data import resolve_model, resolve_task
from ..errors import ConfigError
from .data import load_data
from .heads import Head, lm_head, load_classifier
from .labelled import class_list, load_labelled, read_labelled
from .export import save_run
from .loop import Log, Progress, Run, TrainResult, fit
from .masked_adamw import MaskedAdamW
from .masks import SparseSettings, UpdateMasks
from .models import load_model, vocab_size
from .setup import Adapted, adapt
from .tasks import ClassifyTask, LMTask


def prepare(
    base: str | Path | nn.Module,
    config: TrainConfig,
    init: str | Path | None = None,
    data: str | Path | None = None,
    tokenizer=None,
    eval_data: str | Path | None = None,
) -> Run:
    """Load the model and the task's data, inject the method's layers, unfreeze the head, build the optimizer.

    ``base`` is a Hugging Face model folder (a causal LM for ``lm``, any family
    with a sequence-classification head for ``classify``), or for ``lm`` any
    ``nn.Module`` mapping token ids to logits (deep-copied: the caller's
    module is never changed).
    """
    torch.manual_seed(config.seed)  # the head's random init, dropout, anything that draws from the global generator
    device = resolve_device(config.device)
    config = replace(config, train_dtype=resolve_train_dtype(config.train_dtype, device))  # recorded as resolved
    model, task, base_name = load_task(base, config, data, tokenizer, eval_data)
    generator = torch.Generator().manual_seed(config.seed)
    adapted = adapt(model, config, init, generator)
    if task.head is not None:
        unfreeze_head(model, task.head, adapted)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    masks = None
    optimizer: torch.optim.Optimizer
    if config.method == "lora-sp":
        named = {f"{path}.{n}": p for path, layer in adapted.layers.items() for n, p in layer.named_parameters()
                 if n in ("lora_A", "lora_B")}
        masks = UpdateMasks(named, config.sparse, seed=config.seed)
        # one bias-correction count per entry: a re-sampled mask must not unfreeze entries at 2.5–3× lr
        optimizer = MaskedAdamW(params, masks.mask_of, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return Run(
        model=model, adapted=adapted, task=task, config=config, device=device, optimizer=optimizer,
        generator=generator, masks=masks, knots=config.chain_knots(),
        provenance={"base": base_name, "init": str(init) if init else None, "data": task.source,
                    "rank": adapted.rank, "alpha": adapted.alpha, "condlora_mode": adapted.mode,
                    "condlora_modes": adapted.modes, "modules": len(adapted.layers), "task": task.name,
                    "head": list(task.head.paths) if task.head else None},
    )


def load_task(base, config: TrainConfig, data, tokenizer, eval_data) -> tuple[nn.Module, LMTask | ClassifyTask, str]:
    """The model as the task needs it, and the task with its data.

    ``base`` and ``data`` may name what the package bundles (``stories260K``, ``austen``, :mod:`lora_lens.data`).
    """
    base, data, eval_data = resolve_model(base), resolve_task(data), resolve_task(eval_data)
    if config.task == "lm":
        if eval_data is not None:
            raise ConfigError("--eval-data is an option of --task classify; --task lm holds out --eval-fraction.")
        model, tokenizer, base_name = load_model(base, tokenizer)
        token_data = load_data(data, config.seq_len, vocab_size(model), tokenizer, config.eval_fraction, config.seed)
        return model, LMTask(token_data, lm_head(model) if config.method == "head-only" else None), base_name
    if data is None:
        raise ConfigError("--task classify needs --data FILE.jsonl ({\"text\": ..., \"label\": ...} per line).")
    _, raw = read_labelled(data)  # the classes decide the head's size, so they are read before the model
    model, tokenizer, base_name, head = load_classifier(base, len(class_list(raw, data)), tokenizer)
    positions = getattr(model.config, "max_position_embeddings", None)
    limit = config.max_length or positions or 512
    if positions and limit > positions:
        warnings.warn(f"--max-length {limit} exceeds the model's {positions} positions; using {positions}.",
                      stacklevel=2)
        limit = positions
    labelled = load_labelled(data, tokenizer=tokenizer, max_length=limit, vocab_size=vocab_size(model),
                             eval_fraction=config.eval_fraction, seed=config.seed, eval_data=eval_data)
    return model, ClassifyTask(labelled, head, bucket=config.length_bucketing), base_name


def unfreeze_head(model: nn.Module, head: Head, adapted: Adapted) -> None:
    """The head trains in full; an adapter inside it would be trained twice over, so it is refused."""
    inside = [p for p in adapted.layers if any(p == h or p.startswith(h + ".") for h in head.paths)]
    if inside:
        raise ConfigError(f"--targets select {inside[:3]} inside the head {list(head.paths)}, which trains in full; "
                          "target modules of the backbone only.")
    for path in head.paths:
        model.get_submodule(path).requires_grad_(True)


#: A held-out loss that fell by less than this share did not move.
NOT_LEARNED = 0.01


def warn_if_not_learned(result: TrainResult, config: TrainConfig) -> None:
    """Warn (one line) when the held-out loss has not moved by ``NOT_LEARNED`` over the run, with what to try."""
    before, after = result.eval_loss_before, result.eval_loss
    if before is None or after is None or not before > 0 or after < before * (1 - NOT_LEARNED):
        return
    warnings.warn(
        f"the adapter did not learn: eval loss {before:.4f} → {after:.4f} over {config.steps} steps (lr {config.lr:g}, "
        f"batch {config.batch_size}); try a lower --lr (e.g. {config.lr / 5:g}) with --batch-size "
        f"{max(16, config.batch_size)}, or more --steps.", stacklevel=3)


def train(
    base: str | Path | nn.Module,
    method: str = "lora",
    *,
    out: str | Path | None = None,
    init: str | Path | None = None,
    data: str | Path | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    seq_len: int = 64,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    eval_fraction: float = 0.1,
    knots: Sequence[int] | None = None,
    links: int | None = None,
    sp_granularity: str = "element",
    sp_targets: str = "both",
    sp_resample: str = "never",
    condlora_mode: str | None = None,
    task: str = "lm",
    eval_data: str | Path | None = None,
    max_length: int | None = None,
    eval_every: int | None = None,
    train_dtype: str = "auto",
    length_bucketing: bool = True,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    tokenizer=None,
    log: Log | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train one adapter with ``method`` and, with ``out``, write it (docs/training.md).

    Methods: ``lora``, ``cora-frozen``, ``cora-init``, ``condlora``,
    ``lora-sp``, ``chain``, ``head-only``. Tasks: ``lm`` (next token) and
    ``classify`` (``data``: JSONL with ``text`` and ``label``; a stratified
    held-out split, or ``eval_data``; the head is trained in full and written
    as PEFT's ``modules_to_save``). ``init``: an init folder (CoRA / CondLoRA) written
    by ``lora-lens cora|condlora init``; without it CoRA's basis and CondLoRA's
    Θ are computed from the base. ``data``: a text or JSONL file; without it,
    the synthetic counting task of :mod:`lora_lens.train.data`. Returns a
    :class:`TrainResult` (losses, eval loss, parameter counts, timings; the
    trained model in ``.model``).
    """
    config = TrainConfig(
        method=method, rank=rank, alpha=alpha, targets=tuple(targets) if targets is not None else None,
        steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, warmup_steps=warmup_steps,
        weight_decay=weight_decay, max_grad_norm=max_grad_norm, eval_fraction=eval_fraction, seed=seed,
        knots=tuple(knots) if knots is not None else None, links=links,
        sparse=SparseSettings(sp_granularity, sp_targets, sp_resample), condlora_mode=condlora_mode, device=device,
        task=task, max_length=max_length, eval_every=eval_every, train_dtype=train_dtype,
        length_bucketing=length_bucketing,
    )
    for p in (base, init, data, eval_data):
        if isinstance(p, (str, Path)) and Path(p).exists():
            register_input(p)  # so that --overwrite can never replace an input
    if out is not None:
        check_destination(out, overwrite)  # refuse before training, not after
    run = prepare(base, config, init=init, data=data, tokenizer=tokenizer, eval_data=eval_data)
    result = fit(run, log=log, progress=progress)
    warn_if_not_learned(result, config)
    if out is not None:
        result = replace(result, output=save_run(run, result, out, overwrite=overwrite))
    return result
