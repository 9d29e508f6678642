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
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..errors import ConfigError
from ._axes import Artists, as_array, module_colours


def compact_count(v: float) -> str:
    """``950``, ``5k``, ``20k``, ``1.2M``: tick labels short enough not to collide."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


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
    # Methods with the same parameter count (lora, cora-init, chain) would sit on one x and hide each other:
    # dodge them by a few per cent in log space; the legend names them (labels beside points collided).
    # (cora-frozen 40,714 and lora-sp 40,711 count as one x too: a cluster is counts within 3 % of each other)
    by_count = sorted((float(d["parameters"]), str(name)) for name, d in methods.items())
    clusters: list[list[str]] = []
    for i, (count, name) in enumerate(by_count):
        if i and count / by_count[i - 1][0] < 1.03:
            clusters[-1].append(name)
        else:
            clusters.append([name])
    same_x = {name: group for group in clusters for name in group}
    for name, d in methods.items():
        c = colours[str(name)]
        y = as_array(d["values"], f"methods[{name!r}][values]", ndim=1)
        group = same_x[str(name)]
        x = float(d["parameters"]) * 1.06 ** (group.index(str(name)) - (len(group) - 1) / 2)
        out += ax.plot(np.full(len(y), x), y, "o", color=c, ms=3, alpha=0.35)
        std = float(y.std(ddof=1)) if len(y) > 1 else 0.0
        bars = ax.errorbar([x], [y.mean()], yerr=[std] if len(y) > 1 else None, fmt="o", color=c, ms=7, capsize=4,
                           label=str(name))
        out += bars.get_children()  # the container is no Artist; its lines and caps are
    ax.set_xscale("log")
    # Labels on the decades and at 2 and 5 only, in compact units ("5k", "20k", "1.2M"): the default labels
    # every minor tick of a short range, which overlapped ("3×10³" over "4×10³").
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: compact_count(v)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12)
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3, which="both")
    out.append(ax.legend(fontsize=8, loc="best", title="method", title_fontsize=8))
    ax.set_title(title or f"{metric} vs trainable parameters (mean ± std over seeds)")
    return out
