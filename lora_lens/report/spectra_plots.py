"""Spectra: singular values per layer, energy curves, effective rank per layer.

Inputs are plain: ``S`` as ``(L, k)``, a list of 1-D arrays (ragged ranks are
fine) or ``{layer: (k,)}``, singular values in descending order.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes

from ..errors import ConfigError
from ..spectra import energy_curve as _energy_curve
from ._axes import (
    Artists, as_rows, as_series, depth_colorbar, depth_colours, layer_labels, grouped_bars, module_colours,
    set_layer_ticks,
)


def _lines_by_depth(ax: Axes, ys: list[np.ndarray], labels: list, colorbar: bool, cmap: str, fig) -> Artists:
    """One line per layer, coloured shallow → deep; a layer colour bar (or a legend)."""
    colours, listed, norm = depth_colours(len(ys), cmap)
    out: Artists = []
    for y, c, lab in zip(ys, colours, labels):
        (line,) = ax.plot(np.arange(1, len(y) + 1), y, color=c, lw=1.4, marker="o" if len(y) <= 16 else None,
                          ms=3, label=f"layer {lab}")
        out.append(line)
    if colorbar:
        out.append(depth_colorbar(ax, labels, listed, norm, fig=fig).ax)
    else:
        out.append(ax.legend(fontsize="small", ncols=2 if len(ys) > 8 else 1))
    ax.set_xlim(0.5, max(len(y) for y in ys) + 0.5)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    return out


def plot_singular_values(ax: Axes, S: Any, layers: Sequence | None = None, *, log: bool = True,
                         normalize: bool = False, title: str | None = None, colorbar: bool = True,
                         cmap: str = "viridis", fig=None) -> Artists:
    """σ_i against i, one line per layer, coloured by depth.

    ``normalize=True`` plots ``σ_i / σ_1`` so layers of different scale share an
    axis; ``log=True`` uses a log y axis (zeros are masked, not clipped).
    """
    rows, keys = as_rows(S, "S")
    labels = layer_labels(layers if layers is not None else keys, len(rows))
    ys = [r / r[0] if normalize and r[0] != 0 else r for r in rows]
    out = _lines_by_depth(ax, ys, labels, colorbar, cmap, fig)
    if log:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("index i (descending)")
    ax.set_ylabel(r"$\sigma_i / \sigma_1$" if normalize else r"singular value $\sigma_i$")
    ax.set_title(title or "Singular values per layer")
    return out


def energy_curve(s: np.ndarray) -> np.ndarray:
    """Energy kept at rank j, :func:`lora_lens.spectra.energy_curve` (a zero update → all ones)."""
    return _energy_curve(torch.from_numpy(np.asarray(s, dtype=np.float64))).numpy()


def plot_energy_curves(ax: Axes, S: Any, layers: Sequence | None = None, *, fraction: float | None = 0.9,
                       title: str | None = None, colorbar: bool = True, cmap: str = "viridis", fig=None) -> Artists:
    """Cumulative σ² fraction against rank j, one line per layer; a dashed line at ``fraction``."""
    rows, keys = as_rows(S, "S")
    labels = layer_labels(layers if layers is not None else keys, len(rows))
    out = _lines_by_depth(ax, [energy_curve(r) for r in rows], labels, colorbar, cmap, fig)
    if fraction is not None:
        out.append(ax.axhline(fraction, color="#d62728", ls="--", lw=1.2, label=f"{fraction:.0%} energy"))
        out.append(ax.text(0.98, fraction, f" {fraction:.0%} energy", transform=ax.get_yaxis_transform(),
                           ha="right", va="bottom", fontsize="small", color="#d62728"))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank j")
    ax.set_ylabel(r"energy kept  $\Sigma_{i \leq j}\, \sigma_i^2 \;/\; \Sigma_i\, \sigma_i^2$")
    ax.set_title(title or "Energy kept at rank j, per layer")
    return out


def plot_effective_rank(ax: Axes, values: Mapping[str, Any] | Any, layers: Sequence | None = None, *,
                        nominal_rank: float | Mapping[str, float] | None = None, kind: str = "bar",
                        metric: str = "effective rank", title: str | None = None) -> Artists:
    """A rank metric per layer, one bar group (or line) per module type; nominal rank dashed.

    ``values``: ``{module_type: (L,)}`` or one ``(L,)`` array. ``metric`` names
    what is shown (e.g. "effective rank exp(H(σ/Σσ))", "stable rank"). A
    ``nominal_rank`` mapping draws one dashed line per module type (rank_pattern).
    """
    series = as_series(values, "values")
    L = len(next(iter(series.values())))
    labels = layer_labels(layers, L)
    colours = module_colours(list(series))
    x = np.arange(L)
    out: Artists = []
    if kind == "bar":
        out += grouped_bars(ax, series, colours, default_label=metric)
    elif kind == "line":
        for name, v in series.items():
            out += ax.plot(x, v, marker="o", ms=4, color=colours[name], label=name or metric)
    else:
        raise ConfigError(f"plot_effective_rank: kind={kind!r}; expected 'bar' or 'line'.")
    if nominal_rank is not None:
        noms = dict(nominal_rank) if isinstance(nominal_rank, Mapping) else {"": nominal_rank}
        same = len(set(noms.values())) == 1
        for name, r in (list(noms.items())[:1] if same else noms.items()):
            colour = "black" if same else colours.get(name, "black")
            out.append(ax.axhline(r, color=colour, ls="--", lw=1.2,
                                  label=f"nominal r = {r:g}" + ("" if same else f" ({name})")))
    set_layer_ticks(ax, "x", labels)
    ax.set_xlabel("layer")
    ax.set_ylabel(metric)
    ax.set_ylim(bottom=0)
    ax.grid(True, axis="y", alpha=0.3)
    # Outside, on the right: bars near the nominal rank fill the top of the axes.
    out.append(ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0)))
    ax.set_title(title or f"{metric[:1].upper()}{metric[1:]} per layer")
    return out
