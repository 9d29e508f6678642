"""A method comparison's headline plot: the metric against the trainable parameters, one point per method.

Input is plain::

    {method: {"parameters": int, "values": [metric per seed, …]}}

Each method is drawn as its seeds (small, faint) and their mean with a bar of
± one sample standard deviation (none for a single seed). Parameters are on a
log axis: the methods differ by orders of magnitude (head-only, CondLoRA, LoRA).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from matplotlib.axes import Axes

from ..errors import ConfigError
from ._axes import Artists, as_array, module_colours


def plot_metric_vs_parameters(ax: Axes, methods: Mapping[str, Mapping[str, Any]], *, metric: str = "accuracy",
                              title: str | None = None) -> Artists:
    """Mean ± std of ``metric`` over seeds against trainable parameters (log x), labelled by method."""
    if not methods:
        raise ConfigError("plot_metric_vs_parameters: no methods given; expected {method: {parameters, values}}.")
    bad = [m for m, d in methods.items() if not {"parameters", "values"} <= set(d) or not d["parameters"] > 0]
    if bad:
        raise ConfigError(f"plot_metric_vs_parameters: {bad} lack 'parameters' (> 0) or 'values'.")
    colours = module_colours([str(m) for m in methods])
    out: Artists = []
    for name, d in methods.items():
        c = colours[str(name)]
        y = as_array(d["values"], f"methods[{name!r}][values]", ndim=1)
        x = float(d["parameters"])
        out += ax.plot(np.full(len(y), x), y, "o", color=c, ms=3, alpha=0.35)
        std = float(y.std(ddof=1)) if len(y) > 1 else 0.0
        out.append(ax.errorbar([x], [y.mean()], yerr=[std] if len(y) > 1 else None, fmt="o", color=c, ms=7,
                               capsize=4, label=str(name)))
        out.append(ax.annotate(str(name), (x, y.mean()), xytext=(6, 4), textcoords="offset points", fontsize=8,
                               color=c))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(title or f"{metric} vs trainable parameters (mean ± std over seeds)")
    return out
