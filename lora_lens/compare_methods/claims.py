"""The papers' claims, judged from the numbers of one comparison.

Every claim compares one method with LoRA on the task's metric (classify:
held-out accuracy, higher is better; lm: held-out loss, lower is better),
seed by seed. Seed ``s`` gives both runs the same data split, batches and head
init, so the comparison is *paired*: with ``d_s`` the advantage of the method
over LoRA on seed ``s`` (sign chosen so that ``d > 0`` favours the method),

    d̄ = mean_s d_s,   h = t_{0.975, n−1} · sd(d) / √n     (n ≥ 2 seeds),

the 95 % confidence interval of the mean advantage is ``[d̄ − h, d̄ + h]``.

- "matches" (non-inferiority with margin ``δ``): *holds* when ``d̄ − h ≥ −δ``,
  *does not hold* when ``d̄ + h < −δ``;
- "beats": *holds* when ``d̄ − h > 0``, *does not hold* when ``d̄ + h ≤ 0``;
- otherwise, with fewer than two seeds, or when every seed gave the same difference (``h = 0``: typically
  ties on a small eval set, which measure no spread at all), *inconclusive given the seed spread*.

The parameter part of a claim ("with 1/12 of the parameters") is reported as
measured (adapter parameters only: the head is the same for every method), not
judged: it follows from the shapes, not from training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..jsonable import JsonFields

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


@dataclass(frozen=True)
class Claim:
    key: str
    method: str
    kind: str  # "matches" | "beats"
    text: str
    paper_ratio: float | None = None  # the parameter ratio the paper states, for the words


CLAIMS = (
    Claim("condlora", "condlora", "matches", "CondLoRA matches LoRA with about 1/12 of its trainable parameters",
          1 / 12),
    Claim("cora-frozen", "cora-frozen", "matches", "CoRA's frozen common basis matches LoRA with half the parameters",
          1 / 2),
    Claim("cora-init", "cora-init", "beats", "CoRA's init beats LoRA's"),
    Claim("lora-sp", "lora-sp", "matches", "LoRA-SP matches LoRA while freezing half the update", 1 / 2),
    Claim("chain", "chain", "beats", "Chain of LoRA beats LoRA at the same step budget"),
    Claim("control", "lora", "beats", "LoRA beats the head-only control (the adapter learns something)"),
)


@dataclass(frozen=True)
class Verdict(JsonFields):
    key: str
    claim: str
    outcome: str  # HOLDS | FAILS | INCONCLUSIVE
    words: str
    metric: str
    method_mean: float | None
    reference_mean: float | None
    advantage: float | None  # d̄ (positive favours the method)
    half_width: float | None  # h
    seeds: int
    parameter_ratio: float | None


def paired_interval(d: list[float]) -> tuple[float, float | None]:
    """``(d̄, h)``: mean and the 95 % t half-width; ``h`` None with fewer than two values."""
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def judge(kind: str, mean: float, half: float | None, margin: float) -> str:
    if half is None or half == 0:  # no spread measured: a zero-width interval is no evidence either way
        return INCONCLUSIVE
    lo, hi = mean - half, mean + half
    if kind == "matches":
        return HOLDS if lo >= -margin else FAILS if hi < -margin else INCONCLUSIVE
    return HOLDS if lo > 0 else FAILS if hi <= 0 else INCONCLUSIVE


def evaluate_claims(per_seed: dict[str, dict[int, float]], adapter_params: dict[str, int], *, metric: str,
                    higher_is_better: bool, margin: float) -> list[Verdict]:
    """Judge every claim whose method (and reference) ran. ``per_seed[method][seed]`` is the metric."""
    out = []
    for c in CLAIMS:
        ref = "head-only" if c.key == "control" else "lora"
        if c.method not in per_seed or ref not in per_seed:
            continue
        seeds = sorted(set(per_seed[c.method]) & set(per_seed[ref]))
        if not seeds:
            continue
        sign = 1.0 if higher_is_better else -1.0
        d = [sign * (per_seed[c.method][s] - per_seed[ref][s]) for s in seeds]
        mean, half = paired_interval(d)
        outcome = judge(c.kind, mean, half, margin)
        m_mean = sum(per_seed[c.method][s] for s in seeds) / len(seeds)
        r_mean = sum(per_seed[ref][s] for s in seeds) / len(seeds)
        ratio = (adapter_params[c.method] / adapter_params[ref]
                 if c.key != "control" and adapter_params.get(ref) else None)
        out.append(Verdict(c.key, c.text, outcome, _words(c, ref, outcome, metric, m_mean, r_mean, mean, half,
                                                           len(seeds), ratio, margin),
                           metric, m_mean, r_mean, mean, half, len(seeds), ratio))
    return out


def _words(c: Claim, ref: str, outcome: str, metric: str, m: float, r: float, d: float, h: float | None, n: int,
           ratio: float | None, margin: float) -> str:
    """The sentence for a verdict, built from the numbers only."""
    pct = metric == "accuracy"
    fmt = (lambda x: f"{100 * x:.1f} %") if pct else (lambda x: f"{x:.4f}")
    fmt_d = (lambda x: f"{100 * x:+.1f} pt") if pct else (lambda x: f"{x:+.4f}")
    spread = f"{fmt_d(d)} ± {fmt_d(h).lstrip('+')} (95 % CI over {n} paired seeds)" if h is not None else \
        f"{fmt_d(d)} from {n} seed (no spread to judge by)"
    s = f"{c.method} {fmt(m)} vs {ref} {fmt(r)} {metric}; advantage {spread}"
    if c.kind == "matches":
        s += f", margin {fmt_d(margin).lstrip('+')}"
    if ratio is not None:
        s += f"; adapter parameters {ratio:.3g}× LoRA's"
        if c.paper_ratio is not None:
            s += f" (paper: {c.paper_ratio:.3g}×)"
    verdict = {HOLDS: "holds", FAILS: "does not hold", INCONCLUSIVE: "inconclusive given the seed spread"}[outcome]
    return f"{verdict}: {s}."
