"""Write a comparison: ``results.json``, ``results.md`` (the table and the claims), and two PNGs.

``results.md`` columns: method · trainable parameters (what the optimizer
updates: adapter + head; LoRA-SP without its masked entries) · the metric's
mean ± sample std over seeds · eval loss · macro-F1 (classify) · time per
training step · peak memory (see :mod:`lora_lens.train.memory` for what it
measures on CPU and on CUDA).
"""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..jsonable import stamp
from .claims import FAILS, HOLDS, MIN_SEEDS, Verdict, outcome_label
from .results import Comparison

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PLOT_METRIC, PLOT_CURVES = "metric_vs_parameters.png", "loss_curves.png"


def _pm(mean, std, pct: bool) -> str:
    if mean is None:
        return "–"
    f = (lambda x: f"{100 * x:.1f}") if pct else (lambda x: f"{x:.4f}")
    return f(mean) + (f" ± {f(std)}" if std is not None else "") + (" %" if pct else "")


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _lengths(s: dict) -> str:
    """classify: the token limit (texts past it are cut, which the run warned about); lm: the block length."""
    if s.get("max_length"):
        return f", texts cut to {s['max_length']} tokens"
    return f", blocks of {s['seq_len']} tokens" if s.get("seq_len") else ""


def _precision(train_dtype: str) -> str:
    return "bfloat16 autocast (float32 master weights)" if train_dtype == "bfloat16" else train_dtype


def markdown(c: Comparison) -> str:
    pct = c.metric == "accuracy"
    s = c.settings
    classify = c.task == "classify"
    metric = "eval accuracy" if pct else c.metric.replace("_", " ")  # lm: the metric is the eval loss itself
    methods = {m.method for m in c.summaries}
    chain = f"; chain splits the {s['steps']} steps over its links" if "chain" in methods else ""
    cols = ["method", "trainable params", f"{metric} (mean ± std)"] + (["eval loss", "macro-F1"] if classify else []) \
        + ["time/step", "peak mem"]
    lines = [
        f"# Method comparison on {Path(s['data']).name} ({c.task}, base {Path(s['base']).name})", "",
        f"rank {s['rank']}, alpha {s['alpha']}, {s['steps']} steps (linear warm-up {s['warmup_steps']}, then linear "
        f"decay), lr {s['lr']}, batch {s['batch_size']}{_lengths(s)}, {100 * s['eval_fraction']:g} % held out, seeds "
        f"{s['seeds']}, {_precision(s['train_dtype'])}{chain}. "
        f"Wall time {c.wall_time_s / 60:.1f} min.", "",
        "| " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) - 1),
    ]
    for m in c.summaries:
        extra = [_pm(m.eval_loss_mean, m.eval_loss_std, False),
                 "–" if m.macro_f1_mean is None else f"{100 * m.macro_f1_mean:.1f} %"] if classify else []
        cells = [m.method, f"{m.trainable_parameters:,}", _pm(m.metric_mean, m.metric_std, pct), *extra,
                 f"{m.time_per_step_s * 1e3:.0f} ms", _mib(m.peak_memory_bytes)]
        lines.append("| " + " | ".join(cells) + " |")
    kind = c.runs[0]["peak_memory_kind"] if c.runs else ""
    head = (f"Trainable parameters include the classification head ({c.runs[0]['head_parameters']:,} for every "
            "method)." if classify else "head-only trains the LM head; every other method trains only its adapter.") \
        if c.runs else ""
    lines += ["", f"Peak memory: {kind} (see docs/training.md). {head}", "",
              "## Claims", "",
              f"Paired over seeds, 95 % t-interval of the advantage over the reference; 'matches' allows a margin "
              f"of {_pm(s['margin'], None, pct).replace(' %', ' pt')}. Verdicts are Holm-corrected over the whole "
              f"table (family-wise error ≤ 2.5 % per direction) and need at least {MIN_SEEDS} paired seeds; the "
              "parameter part of a claim is judged against the paper's ratio.", "",
              "| claim | outcome | numbers |", "|---|---|---|"]
    for v in c.claims:
        lines.append(f"| {v.claim} | **{outcome_label(v)}** | {v.words.split(': ', 1)[1]} |")
    control = next((v for v in c.claims if v.key == "control"), None)
    if control is not None and control.outcome != HOLDS:
        lines += ["", control_sentence(control)]
    if c.analyses:
        lines += ["", "## Adapters", ""] + _analyses_lines(c.analyses)
    env = c.environment
    lines += ["", "## Environment", "", ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), ""]
    return "\n".join(lines)


def control_sentence(v: Verdict) -> str:
    """What an unresolved control means, in words that match its numbers: a large but noisy advantage is
    *inconclusive given the seed spread*, not "the adapters changed little"."""
    pct = v.metric == "accuracy"
    adv = "" if v.advantage is None else (f" ({100 * v.advantage:+.1f} pt" if pct else f" ({v.advantage:+.4f}")
    if adv:
        adv += (f" ± {100 * v.half_width:.1f} pt)" if pct else f" ± {v.half_width:.4f})") if v.half_width else ")"
    if v.outcome == FAILS:
        return (f"LoRA does not beat the head-only control here{adv}: at this budget the adapters did not help the "
                "predictions, so the verdicts above say little about the methods. More steps (or a higher learning "
                "rate) would be needed to test them.")
    if v.seeds < MIN_SEEDS:
        why = f"with {v.seeds} seed(s) no verdict is given (at least {MIN_SEEDS} are needed)"
    else:
        why = "the seeds disagree too much to tell it from noise"
    more = f" About {v.seeds_to_resolve} seeds would resolve it at this spread." if v.seeds_to_resolve else ""
    return (f"Whether LoRA beats the head-only control is inconclusive given the seed spread{adv}: {why}. Until it "
            f"resolves, the other verdicts cannot separate the methods from seed noise.{more}")


def _analyses_lines(a: dict) -> list[str]:
    out = []
    if a.get("seed_phi"):
        out += ["φ between seeds of one method (ΔW column spaces, mean over modules and seed pairs; random: "
                "subspaces of the same sizes):", "", "| method | φ | random φ |", "|---|---:|---:|"]
        out += [f"| {m} | {d['phi']:.3f} | {d['random_phi']:.3f} |" for m, d in a["seed_phi"].items()]
        out.append("")
    if a.get("cora_overlap"):
        d = a["cora_overlap"]
        out += [f"CoRA's frozen basis vs what LoRA learned (same seed): φ = {d['phi']:.3f} (random "
                f"{d['random_phi']:.3f}, {d['seeds']} seeds).", ""]
    if a.get("condlora_conversion"):
        out += ["LoRA's conversion matrices across layers (CondLoRA's premise: φ above both baselines):", "",
                "| module · side | φ off-diagonal | Gaussian | W0-aware |", "|---|---:|---:|---:|"]
        out += [f"| {g['module_type']} · {g['side']} | {g['phi_offdiag']:.3f} | {g['gaussian_offdiag']:.3f} | "
                f"{g['structural_offdiag']:.3f} |" for g in a["condlora_conversion"]]
    return out


def figures(c: Comparison) -> dict[str, bytes]:
    from ..report import figure_to_png_bytes, new_figure, panel_figure, plot_loss_curves, plot_metric_vs_parameters

    fig, ax = new_figure(size=(7, 4.5))
    points = {m.method: {"parameters": m.trainable_parameters,
                         "values": [r["eval_accuracy"] if c.metric == "accuracy" else r["eval_loss"]
                                    for r in c.runs if r["method"] == m.method]} for m in c.summaries}
    plot_metric_vs_parameters(ax, points, metric=f"eval {c.metric}")
    out = {PLOT_METRIC: figure_to_png_bytes(fig)}
    by_method = {m.method: {r["run"].rsplit("-", 1)[1]: c.curves[r["run"]] for r in c.runs if r["method"] == m.method}
                 for m in c.summaries}
    out[PLOT_CURVES] = figure_to_png_bytes(panel_figure(by_method, plot_loss_curves, ncols=4, smooth=0.8))
    return out


def write_comparison(c: Comparison, folder: Path) -> None:
    """Into ``folder`` (the comparison's temporary output, renamed to OUT when complete)."""
    atomic_write_json(folder / RESULTS_JSON, stamp("comparison", {
        "settings": c.settings, "environment": c.environment, "task": c.task, "metric": c.metric,
        "summary": c.summaries, "claims": c.claims, "analyses": c.analyses, "runs": c.runs,
        "wall_time_s": c.wall_time_s,
    }))
    atomic_write_text(folder / RESULTS_MD, markdown(c))
    for name, png in figures(c).items():
        atomic_write_bytes(folder / name, png)
