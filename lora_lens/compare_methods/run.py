"""Train every method × seed at one budget and summarise: the engine of ``lora-lens compare-methods``.

Every run gets the same rank, alpha, targets, steps, learning-rate schedule,
batch size, data split (per seed) and head init (per seed); Chain of LoRA
splits the same step budget over its links. Runs are written to
``OUT/runs/<method>-seed<s>/`` (each a ``lora-lens train`` output, so the
adapters can be analysed like any other).
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

from ..compute import resolve_device
from ..data import resolve_model, resolve_task
from ..errors import ConfigError
from ..io.atomic import atomic_directory, check_destination, register_input
from ..train import METHODS, train
from ..train.config import TASK_DEFAULTS, native_bf16, resolve_train_dtype
from .claims import MIN_SEEDS, evaluate_claims
from .output import write_comparison
from .results import Comparison, MethodSummary

DEFAULT_MARGIN = {"classify": 0.01, "lm": 0.02}  # 1 accuracy point; 0.02 nats


def _mean_std(xs: Sequence[float | None]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def environment() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "sklearn"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    from .. import __version__

    return {"lora_lens": __version__, **versions, "machine": platform.machine(), "system": platform.system(),
            "processor": platform.processor() or None, "cpu_count": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(), "cpu_native_bf16": native_bf16(torch.device("cpu")),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def compare_methods(
    base: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    task: str = "classify",
    methods: Sequence[str] | None = None,
    seeds: int | Sequence[int] = 3,
    rank: int = 8,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    steps: int = 200,
    lr: float | None = None,
    batch_size: int | None = None,
    max_length: int | None = 128,
    seq_len: int = 64,
    eval_fraction: float = 0.1,
    eval_every: int | None = None,
    margin: float | None = None,
    train_dtype: str = "auto",
    device: str = "auto",
    overwrite: bool = False,
    analyze: bool = True,
    log: Callable[[str], None] = lambda msg: None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Comparison:
    """Train ``methods`` × ``seeds``, judge the claims (:mod:`.claims`) and write everything (:mod:`.output`).

    ``log`` gets a line per run ("run k of N: method, seed s …" and its result); ``progress(done, total, what)``
    counts training steps over the whole comparison (``total`` = runs × steps), ``what`` naming the run, so a
    caller can draw one bar with an ETA.
    """
    t0 = time.perf_counter()
    methods = list(methods) if methods else list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise ConfigError(f"--methods {methods}: {'unknown ' + str(unknown) if unknown else 'repeated names'}; "
                          f"expected distinct names among {list(METHODS)}.")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or len(set(seed_list)) != len(seed_list):
        raise ConfigError(f"--seeds {seeds}: expected a positive count or distinct seeds.")
    out = Path(out)
    given_base = str(base)  # the name the user gave (all-MiniLM-L6-v2), for the title: its folder is called "model"
    base, data = resolve_model(base), resolve_task(data)  # a bundled name (stories260K, austen) or a path
    for p in (base, data):
        if Path(p).exists():
            register_input(p)
    check_destination(out, overwrite)  # refuse before hours of training, not after
    if task not in TASK_DEFAULTS:
        raise ConfigError(f"unknown task {task!r}; expected one of {list(TASK_DEFAULTS)}.")
    lr = TASK_DEFAULTS[task]["lr"] if lr is None else lr  # the trainer's defaults, written into the settings
    batch_size = TASK_DEFAULTS[task]["batch_size"] if batch_size is None else batch_size
    metric = "accuracy" if task == "classify" else "eval_loss"
    margin = DEFAULT_MARGIN.get(task, 0.01) if margin is None else margin
    alpha = 2.0 * rank if alpha is None else alpha
    train_dtype = resolve_train_dtype(train_dtype, resolve_device(device))  # one precision for every run, recorded
    settings = dict(base=given_base, data=str(data), task=task, methods=methods, seeds=seed_list, rank=rank,
                    alpha=alpha, targets=list(targets) if targets else None, steps=steps, lr=lr,
                    batch_size=batch_size, max_length=max_length if task == "classify" else None,
                    seq_len=seq_len if task == "lm" else None, eval_fraction=eval_fraction, eval_every=eval_every,
                    margin=margin, train_dtype=train_dtype, device=device, warmup_steps=round(0.1 * steps),
                    schedule="linear")
    common = dict(rank=rank, alpha=alpha, targets=targets, steps=steps, lr=lr, batch_size=batch_size,
                  eval_fraction=eval_fraction, eval_every=eval_every, train_dtype=train_dtype, device=device,
                  task=task, seq_len=seq_len, **({"max_length": max_length} if task == "classify" else {}))
    runs, curves = [], {}
    plan = [(method, seed) for method in methods for seed in seed_list]
    if len(seed_list) < MIN_SEEDS:
        log(f"note: {len(seed_list)} seed(s): the claims need at least {MIN_SEEDS} paired seeds for a verdict, so "
            f"every claim will read inconclusive (--seeds {MIN_SEEDS} or more).")
    with atomic_directory(out, overwrite=overwrite) as tmp:  # nothing appears at OUT unless everything worked
        for k, (method, seed) in enumerate(plan):
            log(f"run {k + 1} of {len(plan)}: {method}, seed {seed}, {steps} steps …")
            name = f"{method}-seed{seed}"
            step_progress = None
            if progress is not None:
                def step_progress(step, total, loss, _k=k, _what=f"run {k + 1}/{len(plan)} {method} seed {seed}"):
                    progress(_k * steps + min(step, steps), len(plan) * steps, f"{_what} · loss {loss:.3f}")
            r = train(base, method, out=tmp / "runs" / name, data=data, seed=seed, progress=step_progress,
                      **common)
            _record_final_output(tmp / "runs" / name, out / "runs" / name)
            d = r.to_dict()
            d.update(seed=seed, run=name, output=str(out / "runs" / name),
                     adapter_parameters=r.trainable_parameters - r.head_parameters)
            runs.append(d)
            curves[name] = r.curves()
            acc = "" if r.eval_accuracy is None else f", accuracy {r.eval_accuracy:.3f}"
            log(f"  eval loss {r.eval_loss:.4f}{acc}, {r.time_per_step_s * 1e3:.0f} ms/step")
        summaries = summarise(runs, methods, metric)
        per_seed = {m: {r["seed"]: _metric(r, metric) for r in runs if r["method"] == m} for m in methods}
        claims = evaluate_claims(per_seed, {s.method: s.adapter_parameters for s in summaries}, metric=metric,
                                 higher_is_better=metric == "accuracy", margin=margin)
        analyses = {}
        if analyze:
            from .analyses import adapter_analyses

            log("analysing the trained adapters …")
            analyses = adapter_analyses(tmp / "runs", base, methods, seed_list, device=device)
        comparison = Comparison(out, task, metric, runs, summaries, claims, settings, environment(), curves,
                                analyses, time.perf_counter() - t0)
        write_comparison(comparison, tmp)
    return comparison


def _record_final_output(folder: Path, final: Path) -> None:
    """A run's train_log.json names the folder it will have once OUT is in place, not the temporary one."""
    import json

    from ..io.atomic import atomic_write_json

    log = folder / "train_log.json"
    atomic_write_json(log, {**json.loads(log.read_text()), "output": str(final)})


def _metric(run: dict, metric: str) -> float:
    return run["eval_accuracy"] if metric == "accuracy" else run["eval_loss"]


def summarise(runs: list[dict], methods: Sequence[str], metric: str) -> list[MethodSummary]:
    out = []
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        mean, std = _mean_std([_metric(r, metric) for r in rs])
        lm, ls = _mean_std([r["eval_loss"] for r in rs])
        f1, _ = _mean_std([r.get("eval_macro_f1") for r in rs])
        out.append(MethodSummary(
            # LoRA-SP's masks differ by seed, so its counts do too: the mean over seeds.
            m, [r["seed"] for r in rs], round(sum(r["trainable_parameters"] for r in rs) / len(rs)),
            round(sum(r["adapter_parameters"] for r in rs) / len(rs)), mean, std, lm,
            ls, f1, sum(r["time_per_step_s"] for r in rs) / len(rs), max(r["peak_memory_bytes"] for r in rs)))
    return out
