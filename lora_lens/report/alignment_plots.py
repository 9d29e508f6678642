"""How ΔW relates to W0: projection norms and amplification (LoRA §7.3), intruder dimensions.

Projection norms ``‖Uᵀ W0 V‖_F`` span orders of magnitude (the LoRA paper's
layer-48 Wq at r=4: 0.32 for ΔW's directions, 21.67 for W0's own, 0.02 for
random ones), so these bars default to a log axis.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from ._axes import (
    Artists, as_array, as_series, grouped_bars, layer_labels, module_colours, series_legend, set_layer_ticks,
    set_titles,
)

PROJECTION_LABELS = ("ΔW's top-r directions", "W0's own top-r directions", "random directions")
PROJECTION_COLOURS = ("#1f77b4", "#2ca02c", "#7f7f7f")


def _finish_layers(ax: Axes, labels: list, ylabel: str) -> None:
    set_layer_ticks(ax, "x", labels)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)


def plot_projection_norms(ax: Axes, delta: Any, own: Any, random: Any, layers: Sequence | None = None, *,
                          rank: int | None = None, delta_norm: Any = None, log: bool = True,
                          title: str | None = None) -> Artists:
    """``‖U_rᵀ W0 V_r‖_F`` per layer for three choices of ``U_r, V_r`` (each ``(L,)``).

    ``delta``: ΔW's top-r singular vectors; ``own``: W0's own top-r; ``random``:
    random orthonormal ones. ``delta_norm`` (optional, ``(L,)``): ``‖ΔW‖_F``,
    drawn as black markers so the amplification is visible by eye.
    """
    series = as_series(dict(zip(PROJECTION_LABELS, (delta, own, random))), "projection norms")
    L = len(series[PROJECTION_LABELS[0]])
    labels = layer_labels(layers, L)
    out = grouped_bars(ax, series, dict(zip(PROJECTION_LABELS, PROJECTION_COLOURS)), log=log)
    if delta_norm is not None:
        dn = as_series(delta_norm, "delta_norm", length=L)[""]
        out += ax.plot(np.arange(L), dn, "k_", ms=14, mew=2, ls="none", label=r"$\|\Delta W\|_F$")
    _finish_layers(ax, labels, r"projection norm  $\|U^\top W_0 V\|_F$")
    # Below the axes: on a log axis there is no empty corner to put four entries in.
    out.append(ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=2))
    r = f" (r = {rank})" if rank is not None else ""
    ax.set_title(title or f"W0 projected on ΔW's, W0's own and random directions{r}")
    return out


def plot_amplification(ax: Axes, factors: Mapping[str, Any] | Any, layers: Sequence | None = None, *,
                       log: bool = False, title: str | None = None) -> Artists:
    """Amplification factor ``‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F`` per layer, one bar per module type.

    ``factors``: ``{module_type: (L,)}`` or one ``(L,)`` array. Large values: ΔW
    amplifies directions that W0 barely uses.
    """
    series = as_series(factors, "factors")
    labels = layer_labels(layers, len(next(iter(series.values()))))
    out = grouped_bars(ax, series, module_colours(list(series)), default_label="amplification", log=log)
    _finish_layers(ax, labels, r"amplification  $\|\Delta W\|_F \;/\; \|U_r^\top W_0 V_r\|_F$")
    if len(series) > 1:
        out.append(series_legend(ax))
    ax.set_title(title or "Amplification factor per layer")
    return out


def plot_intruder_counts(ax: Axes, counts: Mapping[str, Any] | Any, layers: Sequence | None = None, *,
                         k: int = 10, eps: float = 0.5, title: str | None = None) -> Artists:
    """Intruder dimensions per layer (Shuttleworth et al.), one bar per module type.

    ``counts``: ``{module_type: (L,)}`` or one ``(L,)`` array: how many of the
    merged weight's top-``k`` singular vectors have ``max |cos|`` with every
    singular vector of W0 below ``eps``. The sub-title gives the total.
    """
    series = as_series(counts, "counts")
    labels = layer_labels(layers, len(next(iter(series.values()))))
    out = grouped_bars(ax, series, module_colours(list(series)), default_label="intruders")
    _finish_layers(ax, labels, f"intruder dimensions (of top {k})")
    ax.set_ylim(0, k)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if len(series) > 1:
        out.append(series_legend(ax))
    total = int(round(sum(float(v.sum()) for v in series.values())))
    per = " · ".join(f"{n} {int(round(v.sum()))}" for n, v in series.items() if n)
    out += set_titles(ax, title or f"Intruder dimensions per layer (top-{k}, ε = {eps:g})",
                      f"total {total}" + (f"  ({per})" if per else ""))
    return out


def plot_intruder_sweep(ax: Axes, eps: Any, counts: Mapping[str, Any] | Any, *, chosen_eps: float | None = 0.5,
                        k: int | None = None, title: str | None = None) -> Artists:
    """Total intruder dimensions against the threshold ε, one line per module type (or adapter).

    ``eps (E,)`` ascending; ``counts``: ``{label: (E,)}`` or one ``(E,)`` array.
    A dashed vertical line marks ``chosen_eps`` (the default 0.5).
    """
    e = as_array(eps, "eps", ndim=1)
    series = as_series(counts, "counts", length=len(e))
    colours = module_colours(list(series))
    out: Artists = []
    for name, v in series.items():
        out += ax.plot(e, v, marker="o", ms=4, color=colours[name], label=name or "all modules")
    if chosen_eps is not None:
        out.append(ax.axvline(chosen_eps, color="#d62728", ls="--", lw=1.2, label=f"ε = {chosen_eps:g}"))
    ax.set_xlabel("ε  (intruder if max |cos| with W0's singular vectors < ε)")
    # two lines: one line was taller than a 4-inch panel and lost both ends to the figure edge
    ax.set_ylabel("intruder dimensions\nsummed over layers" + (f" (top {k} per module)" if k else ""))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    out.append(series_legend(ax, inside=4))  # up to three lines and the ε marker fit in a corner
    ax.set_title(title or "Intruder dimensions vs threshold ε")
    return out
