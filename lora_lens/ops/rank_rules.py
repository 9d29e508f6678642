"""How many singular directions an operation keeps (resize, extract): one definition for all.

For ``S (k,)`` descending and non-negative, each rule returns the kept rank ``j``:

=================  =====================================================================  ==============
method             rule (smallest ``j`` unless said)                                      ``param`` range
=================  =====================================================================  ==============
``rank``           ``j = P``                                                              integer ≥ 1
``sv_ratio``       ``j = #{i : σ_i > σ_1 / P}`` (sd-scripts ``index_sv_ratio``)            P ≥ 1
``sv_cumulative``  ``Σ_{i≤j} σ_i / Σ σ ≥ P`` (sd-scripts ``index_sv_cumulative``)          0 < P ≤ 1
``sv_fro``         ``√(Σ_{i≤j} σ_i² / Σ σ²) ≥ P`` (sd-scripts ``index_sv_fro``)            0 < P ≤ 1
``energy``         ``Σ_{i≤j} σ_i² / Σ σ² ≥ P`` (PEFT's convention, :func:`rank_at_energy`)  0 < P ≤ 1
=================  =====================================================================  ==============

The result is then capped by ``max_rank`` (and by ``k``) and is at least 1, so a
zero update is written as one zero pair. sd-scripts also caps at ``k − 1``
(``min(index, len(S) - 1)``), which can never keep a full-rank update whole; we
do not, and docs/weights.md says so. Sums run in float64.
"""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..spectra import rank_at_energy

#: The rank rules, in the order ``--method`` lists them.
RANK_METHODS = ("rank", "sv_ratio", "sv_fro", "sv_cumulative", "energy")


def check_rank_rule(method: str, param: float, max_rank: int | None = None) -> None:
    """Refuse an unknown ``method`` or a ``param`` / ``max_rank`` outside its range, naming the allowed one."""
    if method not in RANK_METHODS:
        raise ConfigError(f"unknown rank method {method!r}; expected one of {', '.join(RANK_METHODS)}.")
    p = float(param)
    if not math.isfinite(p):
        raise ConfigError(f"--param {param!r} for {method} is not a finite number.")
    if method == "rank" and (p != int(p) or p < 1):
        raise ConfigError(f"--rank {param!r} must be an integer ≥ 1.")
    if method == "sv_ratio" and p < 1:
        raise ConfigError(f"--param {param!r} for sv_ratio must be ≥ 1 (σ_i > σ_1/P keeps at least σ_1 at P = 1).")
    if method in ("sv_fro", "sv_cumulative", "energy") and not 0 < p <= 1:
        raise ConfigError(f"--param {param!r} for {method} must be in (0, 1] (a fraction of the norm it measures).")
    if max_rank is not None and (int(max_rank) != max_rank or max_rank < 1):
        raise ConfigError(f"--max-rank {max_rank!r} must be an integer ≥ 1.")


def _smallest_reaching(fractions: torch.Tensor, target: float) -> int:
    """Smallest ``j`` (1-based) with ``fractions[j-1] ≥ target`` for non-decreasing ``fractions``."""
    return int((fractions < target).sum()) + 1


def select_rank(S: torch.Tensor, method: str, param: float, *, max_rank: int | None = None) -> int:
    """The rank kept of one spectrum ``S (k,)`` (descending) under ``method`` / ``param``; see the module table."""
    check_rank_rule(method, param, max_rank)
    S = S.detach().to("cpu", torch.float64).reshape(-1)
    k = int(S.numel())
    if k == 0:
        return 1
    if method == "rank":
        j = int(param)
    elif method == "energy":
        j = int(rank_at_energy(S, float(param)))
    else:
        total = float(S.sum()) if method == "sv_cumulative" else float((S * S).sum())
        if total <= 0:
            j = 1
        elif method == "sv_ratio":
            j = int((S > S[0] / float(param)).sum())
        elif method == "sv_cumulative":
            j = _smallest_reaching(S.cumsum(0) / total, float(param))
        else:  # sv_fro: compare squared fractions with P², as sd-scripts does
            j = _smallest_reaching((S * S).cumsum(0) / total, float(param) ** 2)
    j = min(j, k)
    if max_rank is not None:
        j = min(j, int(max_rank))
    return max(1, j)
