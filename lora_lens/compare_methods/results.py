"""What a method comparison produces: per-method summaries and the whole :class:`Comparison`.

Plain frozen data shared by :mod:`.run` (which computes it) and :mod:`.output` (which writes it),
so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .claims import Verdict


@dataclass(frozen=True)
class MethodSummary:
    """One method over its seeds; ``*_std`` is the sample standard deviation (None for one seed)."""

    method: str
    seeds: list[int]
    trainable_parameters: int
    adapter_parameters: int
    metric_mean: float
    metric_std: float | None
    eval_loss_mean: float | None
    eval_loss_std: float | None
    macro_f1_mean: float | None
    time_per_step_s: float
    peak_memory_bytes: int


@dataclass(frozen=True, eq=False)
class Comparison:
    out: Path
    task: str
    metric: str
    runs: list[dict]
    summaries: list[MethodSummary]
    claims: list[Verdict]
    settings: dict
    environment: dict
    curves: dict[str, dict] = field(default_factory=dict)
    analyses: dict = field(default_factory=dict)
    wall_time_s: float = 0.0
