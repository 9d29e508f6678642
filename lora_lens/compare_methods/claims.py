"""The papers' claims, judged from the numbers of one comparison.

Every claim compares one method with LoRA on the task's metric (classify:
held-out accuracy, higher is better; lm: held-out loss, lower is better),
seed by seed. Seed ``s`` gives both runs the same data split, batches and head
init, so the comparison is *paired*: with ``d_s`` the advantage of the method
over LoRA on seed ``s`` (sign chosen so that ``d > 0`` favours the method),

    d̄ = mean_s d_s,   se = sd(d) / √n,   h = t_{0.975, n−1} · se,

and ``[d̄ − h, d̄ + h]`` is the 95 % confidence interval of the mean advantage
that the table shows. Each claim is two one-sided t-tests on ``n − 1`` degrees
of freedom, with ``δ`` the "matches" margin (0 for "beats"):

- *holds*: reject ``H₀: mean d ≤ −δ`` ("matches", non-inferiority) or ``mean d ≤ 0`` ("beats"),
  ``p_hold = P(T ≥ (d̄ + δ)/se)``;
- *does not hold*: reject the claim itself, ``p_fail = P(T ≤ (d̄ + δ)/se)``.

**Multiple comparisons.** A table judges up to 6 claims, so up to 12 such
hypotheses; each is tested at one-sided level 0.025 (the 95 % interval's
tail), and Holm's step-down procedure over all of them keeps the chance of
*any* wrong verdict in the table at ≤ 0.025: sort the p-values, reject the
``i``-th smallest (0-based) while ``p ≤ 0.025 / (M − i)``. Without it, with
every method equal to LoRA, some "beats" claim read "holds" in about 7 % of
tables (tests/test_compare_methods.py simulates it). A single claim judged
alone is exactly "the 95 % interval lies above −δ (or 0)".

**No verdict** (*inconclusive*) with fewer than :data:`MIN_SEEDS` paired
seeds, or when the seeds measured no spread: every seed gave the same
difference up to rounding (``se ≤ 1e-9 · max(1, |d̄|)``; accuracies equal in
exact arithmetic can differ by one ulp, which must not read as evidence).
For an inconclusive claim the words estimate how many seeds would resolve it
at the measured spread (Bonferroni over the table, so conservative).

**The parameter part** ("with 1/12 of the parameters") is judged too, from
adapter parameters only (the head is the same for every method): a claim whose
accuracy part holds at a larger ratio than the paper's reads "holds at 1/6 of
LoRA's parameters (paper: 1/12)".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..jsonable import JsonFields

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
#: Paired seeds below which no claim gets a verdict.
MIN_SEEDS = 3
#: One-sided level of each test: the tail of a 95 % two-sided interval.
LEVEL = 0.025
#: ``se`` at or below this (relative to ``max(1, |d̄|)``) is no spread at all: ties up to rounding.
TIE_TOLERANCE = 1e-9
#: A measured parameter ratio within this factor of the paper's is "as the paper states".
RATIO_SLACK = 1.05


@dataclass(frozen=True)
class Claim:
    key: str
    method: str
    kind: str  # "matches" | "beats"
    text: str
    paper_ratio: float | None = None  # the parameter ratio the paper states, judged too


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
    half_width: float | None  # h, unadjusted 95 %
    seeds: int
    parameter_ratio: float | None
    p_value: float | None = None  # Holm-adjusted p of the direction the data favour
    parameter_part: str | None = None  # "as stated" | "at 1/6 (paper: 1/12)" | None (no parameter part)
    seeds_to_resolve: int | None = None  # inconclusive only: seeds that would resolve it at this spread


def paired_interval(d: list[float]) -> tuple[float, float | None]:
    """``(d̄, h)``: mean and the 95 % t half-width; ``h`` None with fewer than two values."""
    n = len(d)
    mean = sum(d) / n
    if n < 2:
        return mean, None
    from scipy.stats import t

    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    return mean, float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


def no_spread(mean: float, half: float | None) -> bool:
    """The seeds measured no spread: one seed, or every difference equal up to rounding."""
    return half is None or half <= TIE_TOLERANCE * max(1.0, abs(mean))


def judge(kind: str, mean: float, half: float | None, margin: float) -> str:
    """One claim alone, unadjusted: *holds* when the 95 % interval lies above ``−δ`` (matches) or 0 (beats)."""
    if no_spread(mean, half):  # a zero-width interval is no evidence either way
        return INCONCLUSIVE
    lo, hi = mean - half, mean + half
    if kind == "matches":
        return HOLDS if lo >= -margin else FAILS if hi < -margin else INCONCLUSIVE
    return HOLDS if lo > 0 else FAILS if hi <= 0 else INCONCLUSIVE


def one_sided_p(d: list[float], shift: float) -> tuple[float, float]:
    """``(p_hold, p_fail)`` of the paired t statistic ``(d̄ + shift) / se`` on ``n − 1`` degrees of freedom."""
    from scipy.stats import t

    n = len(d)
    mean = sum(d) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
    stat = (mean + shift) / se
    return float(t.sf(stat, n - 1)), float(t.cdf(stat, n - 1))


def holm(pvalues: list[float], level: float = LEVEL) -> list[bool]:
    """Holm's step-down: which of ``pvalues`` are rejected, family-wise error ≤ ``level``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    rejected = [False] * len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > level / (len(pvalues) - rank):
            break
        rejected[i] = True
    return rejected


def holm_adjusted(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values: ``max_{j≤i} min(1, (M − j) p_(j))`` in sorted order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [1.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def seeds_to_resolve(d: list[float], shift: float, tests: int, cap: int = 1000) -> int | None:
    """Smallest ``n`` at which ``|d̄ + shift|`` would clear ``t_{1−LEVEL/tests, n−1} · sd/√n`` at the measured
    mean and sd (Bonferroni over ``tests``: conservative); None beyond ``cap`` or at zero distance."""
    import numpy as np
    from scipy.stats import t

    n0 = len(d)
    mean = sum(d) / n0
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n0 - 1))
    gap = abs(mean + shift)
    if gap == 0 or sd == 0:
        return None
    n = np.arange(max(n0, MIN_SEEDS), cap + 1)
    ok = np.nonzero(t.ppf(1 - LEVEL / max(1, tests), n - 1) * sd / np.sqrt(n) < gap)[0]  # half-width shrinks with n
    return int(n[ok[0]]) if ok.size else None


def fraction(r: float) -> str:
    """``1/6`` for a ratio near a unit fraction, else ``0.23×``."""
    if r > 0 and r <= 1:
        k = round(1 / r)
        if k >= 1 and abs(1 / r - k) <= 0.05 * k:
            return f"1/{k}"
    return f"{r:.3g}×"


def evaluate_claims(per_seed: dict[str, dict[int, float]], adapter_params: dict[str, int], *, metric: str,
                    higher_is_better: bool, margin: float) -> list[Verdict]:
    """Judge every claim whose method (and reference) ran, Holm-corrected over the table (module docstring).

    ``per_seed[method][seed]`` is the metric.
    """
    sign = 1.0 if higher_is_better else -1.0
    rows = []  # (claim, reference, paired differences, shift)
    for c in CLAIMS:
        ref = "head-only" if c.key == "control" else "lora"
        if c.method not in per_seed or ref not in per_seed:
            continue
        seeds = sorted(set(per_seed[c.method]) & set(per_seed[ref]))
        if seeds:
            d = [sign * (per_seed[c.method][s] - per_seed[ref][s]) for s in seeds]
            rows.append((c, ref, seeds, d, margin if c.kind == "matches" else 0.0))
    # the family: two one-sided hypotheses per claim that can be judged at all
    judged = [i for i, (_, _, _, d, _) in enumerate(rows)
              if len(d) >= MIN_SEEDS and not no_spread(*paired_interval(d))]
    pvals = {i: one_sided_p(rows[i][3], rows[i][4]) for i in judged}
    flat = [p for i in judged for p in pvals[i]]
    rejected, adjusted = holm(flat), holm_adjusted(flat)
    out = []
    for i, (c, ref, seeds, d, shift) in enumerate(rows):
        mean, half = paired_interval(d)
        outcome, p_adj, need = INCONCLUSIVE, None, None
        if i in pvals:
            j = 2 * judged.index(i)
            outcome = HOLDS if rejected[j] else FAILS if rejected[j + 1] else INCONCLUSIVE
            p_adj = min(adjusted[j], adjusted[j + 1])
            if outcome == INCONCLUSIVE:
                need = seeds_to_resolve(d, shift, max(1, len(flat)))
        m_mean = sum(per_seed[c.method][s] for s in seeds) / len(seeds)
        r_mean = sum(per_seed[ref][s] for s in seeds) / len(seeds)
        ratio = (adapter_params[c.method] / adapter_params[ref]
                 if c.key != "control" and adapter_params.get(ref) else None)
        part = None
        if c.paper_ratio is not None and ratio is not None:
            part = "as stated" if ratio <= c.paper_ratio * RATIO_SLACK else \
                f"at {fraction(ratio)} (paper: {fraction(c.paper_ratio)})"
        out.append(Verdict(c.key, c.text, outcome,
                           _words(c, ref, outcome, metric, m_mean, r_mean, mean, half, len(seeds), ratio, margin,
                                  part, p_adj, need),
                           metric, m_mean, r_mean, mean, half, len(seeds), ratio, p_adj, part, need))
    return out


def outcome_label(v: Verdict) -> str:
    """The outcome as a table cell says it: ``holds at 1/6 of LoRA's parameters (paper: 1/12)`` where the parameter
    part differs from the paper's."""
    if v.outcome == HOLDS and v.parameter_part and v.parameter_part != "as stated":
        return "holds " + v.parameter_part.replace(" (", " of LoRA's parameters (", 1)
    return v.outcome


def _words(c: Claim, ref: str, outcome: str, metric: str, m: float, r: float, d: float, h: float | None, n: int,
           ratio: float | None, margin: float, part: str | None, p_adj: float | None, need: int | None) -> str:
    """The sentence for a verdict, built from the numbers only."""
    pct = metric == "accuracy"
    fmt = (lambda x: f"{100 * x:.1f} %") if pct else (lambda x: f"{x:.4f}")
    fmt_d = (lambda x: f"{100 * x:+.1f} pt") if pct else (lambda x: f"{x:+.4f}")
    spread = f"{fmt_d(d)} ± {fmt_d(h).lstrip('+')} (95 % CI over {n} paired seeds)" if h is not None else \
        f"{fmt_d(d)} from {n} seed (no spread to judge by)"
    s = f"{c.method} {fmt(m)} vs {ref} {fmt(r)} {metric}; advantage {spread}"
    if c.kind == "matches":
        s += f", margin {fmt_d(margin).lstrip('+')}"
    if p_adj is not None:
        s += f"; Holm-adjusted p {p_adj:.2g}"
    if ratio is not None:
        s += f"; adapter parameters {fraction(ratio)} of LoRA's"
        if c.paper_ratio is not None:
            s += f" (paper: {fraction(c.paper_ratio)})"
    if outcome == INCONCLUSIVE:
        if n < MIN_SEEDS:
            verdict = f"inconclusive: not judged, a verdict needs at least {MIN_SEEDS} paired seeds (got {n})"
        elif no_spread(d, h):
            verdict = "inconclusive: every seed gave the same difference, so the spread is unmeasured"
        else:
            verdict = "inconclusive given the seed spread"
            s += f"; about {need} seeds would resolve it at this spread" if need else \
                "; no feasible number of seeds resolves it at this spread (the advantage sits on the threshold)"
    else:
        verdict = outcome_label(Verdict(c.key, c.text, outcome, "", metric, m, r, d, h, n, ratio, p_adj, part))
    return f"{verdict}: {s}."
