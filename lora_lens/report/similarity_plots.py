"""Subspace similarity heatmaps: layers × layers, adapter vs adapter, the φ(i, j) grid, CondLoRA.

φ (LoRA §7) lies in [0, 1]; every heatmap shows a random baseline (the same φ for
Gaussian matrices of the same shapes) as a line across the colour bar and in the
sub-title, so "high" always means "high compared to chance".
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize, PowerNorm

from ..errors import ConfigError, ShapeError
from ._axes import (
    Artists, add_colorbar, annotate_cells, as_array, baseline_items, baseline_note, layer_labels, mark_baselines,
    set_layer_ticks, set_titles,
)

Baseline = float | Mapping[str, float] | None


def _norm(scale: str, vmin: float, vmax: float) -> Normalize:
    """Colour scale for values in ``[vmin, vmax]``: linear, sqrt (spreads small φ) or log.

    A degenerate range (an all-zero grid) is widened so the scale stays valid.
    """
    if scale == "log":
        vmin = max(vmin, 1e-3)
    if not vmax > vmin:  # also catches NaN
        vmax = vmin * 10 if scale == "log" else vmin + 1.0
    if scale == "linear":
        return Normalize(vmin, vmax)
    if scale == "sqrt":
        return PowerNorm(0.5, vmin, vmax)
    if scale == "log":
        return LogNorm(vmin, vmax)
    raise ConfigError(f"scale={scale!r}; expected 'linear', 'sqrt' or 'log'.")


def _heatmap(ax: Axes, values: np.ndarray, *, title: str, baselines: list[tuple[str, float]],
             annotate: bool | None, scale: str, vmin: float, vmax: float | None, cmap: str, cbar_label: str,
             note: str, fig) -> Artists:
    """Shared body: the image, an optional value in each cell, a colour bar with the baselines marked,
    the title with ``note`` and the baselines under it."""
    vmax = float(np.nanmax(values)) if vmax is None else vmax
    norm = _norm(scale, vmin, vmax)
    shown = np.clip(values, norm.vmin, None) if scale == "log" else values
    img = ax.imshow(shown, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    out: Artists = [img]
    if annotate is None:
        annotate = max(values.shape) <= 12
    if annotate:
        out += annotate_cells(ax, values, norm)
    cb = add_colorbar(ax, img, cbar_label, fig=fig)
    out.append(cb.ax)
    out += mark_baselines(cb, baselines)
    parts = [t for t in (note, baseline_note(baselines)) if t]
    out += set_titles(ax, title, (" · " if sum(map(len, parts)) < 60 else "\n").join(parts))
    return out


def _square(values: Any, name: str) -> np.ndarray:
    a = as_array(values, name, ndim=2)
    if a.shape[0] != a.shape[1]:
        raise ShapeError(f"{name}: got shape {a.shape}; expected a square (L, L) grid.")
    return a


def _off_diagonal_mean(a: np.ndarray) -> float | None:
    L = a.shape[0]
    return float(a[~np.eye(L, dtype=bool)].mean()) if L > 1 else None


def plot_phi_heatmap(ax: Axes, phi: Any, layers: Sequence | None = None, *, baseline: Baseline = None,
                     title: str | None = None, annotate: bool | None = None, scale: str = "linear",
                     vmin: float = 0.0, vmax: float | None = 1.0, cmap: str = "viridis",
                     cbar_label: str = "φ (subspace similarity)", fig=None) -> Artists:
    """φ between every pair of layers of one module type: ``phi (L, L)``, rows and columns = layers.

    ``baseline``: the random φ for these shapes, a number or ``{label: number}``
    (several baselines, e.g. Gaussian and structure-aware). Cells carry their
    value when the grid is small (``annotate=None`` → automatic, ≤ 12 layers).
    The sub-title gives the mean off-diagonal φ next to the baselines.
    """
    a = _square(phi, "phi")
    labels = layer_labels(layers, a.shape[0])
    off = _off_diagonal_mean(a)
    out = _heatmap(ax, a, title=title or "φ between layers", baselines=baseline_items(baseline),
                   annotate=annotate, scale=scale, vmin=vmin,
                   vmax=vmax, cmap=cmap, cbar_label=cbar_label,
                   note=f"mean off-diagonal φ = {off:.3g}" if off is not None else "", fig=fig)
    set_layer_ticks(ax, "x", labels)
    set_layer_ticks(ax, "y", labels)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    return out


def plot_adapter_heatmap(ax: Axes, values: Any, modules: Sequence[str], layers: Sequence | None = None, *,
                         baseline: float | Mapping[str, float] | Sequence[float] | None = None,
                         labels: tuple[str, str] = ("adapter A", "adapter B"), title: str | None = None,
                         annotate: bool | None = None, scale: str = "linear", cmap: str = "viridis",
                         fig=None) -> Artists:
    """φ between two adapters at the same layer: ``values (M, L)``, rows = module types, columns = layers.

    ``baseline``: one number for all rows, or one per module type (a mapping
    ``{module: value}`` or a length-M sequence; shapes differ between module
    types). Per-row baselines are written in the row labels.
    """
    a = as_array(values, "values", ndim=2)
    modules = [str(m) for m in modules]
    if len(modules) != a.shape[0]:
        raise ShapeError(f"modules: {len(modules)} names for {a.shape[0]} rows of values; give one per row.")
    cols = layer_labels(layers, a.shape[1])
    per_row: list[float] | None = None
    if isinstance(baseline, Mapping):
        missing = [m for m in modules if m not in baseline]
        if missing:
            raise ShapeError(f"baseline: no value for module types {missing}; give one per row.")
        per_row = [float(baseline[m]) for m in modules]
    elif baseline is not None and not np.isscalar(baseline):
        per_row = [float(v) for v in as_array(baseline, "baseline", ndim=1)]
        if len(per_row) != len(modules):
            raise ShapeError(f"baseline: {len(per_row)} values for {len(modules)} module types; give one per row.")
    if per_row is not None and len(set(per_row)) == 1:
        baseline, per_row = per_row[0], None
    items = baseline_items(baseline) if per_row is None else [("random (mean)", float(np.mean(per_row)))]
    out = _heatmap(ax, a, title=title or f"φ({labels[0]}, {labels[1]}) per layer", baselines=items,
                   annotate=annotate, scale=scale, vmin=0.0, vmax=1.0, cmap=cmap,
                   cbar_label="φ (subspace similarity)", note=f"mean φ = {np.nanmean(a):.3g}", fig=fig)
    set_layer_ticks(ax, "x", cols)
    rows = modules if per_row is None else [f"{m}\n(random {b:.2g})" for m, b in zip(modules, per_row)]
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("layer")
    ax.set_ylabel("module type")
    return out


def _rank_ticks(ax: Axes, axis: str, r: int, max_ticks: int = 10) -> None:
    """Ticks at 1 and at multiples of a power of two, for 1-based rank indices drawn at positions ``0 … r-1``."""
    step = 1
    while r / step > max_ticks:
        step *= 2
    vals = sorted({1, *range(step, r + 1, step)})
    (ax.set_xticks if axis == "x" else ax.set_yticks)([v - 1 for v in vals], [str(v) for v in vals])


def plot_phi_grid(ax: Axes, grid: Any, *, labels: tuple[str, str] = ("X", "Y"), baseline: Any = None,
                  title: str | None = None, annotate: bool | None = None, cmap: str = "viridis",
                  fig=None) -> Artists:
    """The LoRA §7.2 grid (its Figure 3): ``φ(X, Y, i, j)`` for ``i ≤ r1`` (y axis) and ``j ≤ r2`` (x axis).

    ``grid (r1, r2)``; ``labels`` name X and Y (e.g. ``"A (r=8)"``, ``"A (r=64)"``).
    ``baseline``: the random φ: a number, ``{label: number}``, or (what the
    maths gives) the per-cell ``(r1, r2)`` grid ``max(i, j)/d``, which grows
    with ``i`` and ``j``: its two ends are marked on the colour bar and its
    range written under the title, never one mean for every cell.
    """
    a = as_array(grid, "grid", ndim=2)
    note, items = "", baseline_items(baseline)
    if baseline is not None and not isinstance(baseline, Mapping) and np.ndim(as_array(baseline, "baseline")) > 0:
        b = as_array(baseline, "baseline", ndim=2)
        if b.shape != a.shape:
            raise ShapeError(f"baseline: got shape {b.shape} for a φ grid of shape {a.shape}; expected the same "
                             "(r1, r2) grid (max(i, j)/d) or one number.")
        items = [("random (i = j = 1)", float(b.min())), ("random (max i, j)", float(b.max()))]
        note = "random φ = max(i, j)/d per cell"
    out = _heatmap(ax, a, title=title or f"φ({labels[0]}, {labels[1]}, i, j)", baselines=items,
                   annotate=annotate, scale="linear", vmin=0.0,
                   vmax=1.0, cmap=cmap, cbar_label="φ(i, j)", note=note, fig=fig)
    _rank_ticks(ax, "y", a.shape[0])
    _rank_ticks(ax, "x", a.shape[1])
    ax.set_ylabel(f"i  (top-i directions of {labels[0]})")
    ax.set_xlabel(f"j  (top-j directions of {labels[1]})")
    return out


def plot_condlora_grid(ax: Axes, phi: Any, layers: Sequence | None = None, *, gaussian_baseline: float,
                       structure_baseline: Any, factor: str = "C_A", module: str | None = None,
                       title: str | None = None, annotate: bool | None = None, scale: str = "linear",
                       vmax: float | None = 1.0, fig=None) -> Artists:
    """CondLoRA conversion matrices (methods §5): φ between layers of ``C_A`` or ``C_B``, with BOTH baselines.

    ``gaussian_baseline``: φ for Gaussian matrices of the same shapes.
    ``structure_baseline``: φ for ``W0⁻¹ G`` (G Gaussian) with each layer's own
    W0, a number or an ``(L, L)`` grid (its off-diagonal mean is shown). Learning
    shows as off-diagonal φ above the structure-aware line, not merely above the
    Gaussian one.
    """
    s = as_array(structure_baseline, "structure_baseline")
    s_val = _off_diagonal_mean(_square(s, "structure_baseline")) if s.ndim == 2 else float(s.mean())
    baselines = {"Gaussian": float(gaussian_baseline), "W0⁻¹G (structure-aware)": s_val}
    where = f" ({module})" if module else ""
    return plot_phi_heatmap(ax, phi, layers, baseline=baselines, annotate=annotate, scale=scale, vmax=vmax,
                            title=title or f"CondLoRA {factor}{where}: φ between layers", fig=fig)
