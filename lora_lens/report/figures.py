"""Figures without pyplot: ``Figure`` + ``FigureCanvasAgg``, PNG bytes, one-panel-per-item grids.

pyplot keeps a global registry of open figures (and picks a GUI backend); a
library that goes through it leaks memory in long runs and breaks on servers.
Here a ``Figure`` is built directly and attached to the Agg canvas, so it
renders headless and is freed like any other object.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: The widest figure (inches) the HTML report shows at a readable scale. Its content column is ~1,100 px,
#: 10 in at the report's 110 dpi, and an image is shrunk to fit it: a 22-in grid came out at 46 %, its
#: 10-pt labels 7 px tall. Up to 12 in, text keeps ≥ 84 % of its size.
MAX_FIGURE_WIDTH = 12.0


def fit_columns(n: int, panel_width: float, max_width: float | None = MAX_FIGURE_WIDTH) -> int:
    """Columns for ``n`` panels of ``panel_width`` inches: as many as fit in ``max_width`` (at least 1, at most n)."""
    if max_width is None:
        return max(1, n)
    return max(1, min(n, int(max_width // panel_width)))


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] | None = None,
               squeeze: bool = True, **subplot_kw) -> tuple[Figure, Any]:
    """A headless ``Figure`` with a grid of axes: ``(fig, ax)`` or ``(fig, axes array)``.

    ``size`` is the whole figure in inches (default 5.5 × 4 per panel). Layout is
    "constrained" so colour bars, titles and labels do not overlap. ``squeeze``
    as in ``Figure.subplots`` (False: always a 2-D array of axes).
    """
    if nrows < 1 or ncols < 1:
        raise ConfigError(f"new_figure: nrows={nrows}, ncols={ncols}; expected both >= 1.")
    if size is None:
        size = (5.5 * ncols, 4.0 * nrows)
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, subplot_kw=subplot_kw or None)
    return fig, axes


def figure_to_png_bytes(fig: Figure, dpi: float = 100) -> bytes:
    """Render ``fig`` with Agg to PNG bytes (no file, no pyplot)."""
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    buf = io.BytesIO()
    # No timestamp in the PNG metadata: the same figure gives the same bytes.
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def panel_figure(items: Mapping[str, Any], plot: Callable[..., Any], ncols: int = 3,
                 panel_size: tuple[float, float] = (4.8, 4.0), suptitle: str | None = None,
                 per_item: Mapping[str, Mapping[str, Any]] | None = None,
                 max_width: float | None = MAX_FIGURE_WIDTH, **plot_kw) -> Figure:
    """One panel per item, e.g. one φ heatmap per module type.

    Calls ``plot(ax, value, title=name, **plot_kw, **per_item[name])`` for each
    ``name, value`` in ``items``: ``per_item`` holds what differs by panel (its
    own baseline and layers: module types of another dimension, GQA k/v next to
    q, have another random φ). Unused grid cells are hidden. ``ncols`` is
    reduced so the figure is at most ``max_width`` inches wide (None: no limit);
    more panels then go to more rows.
    """
    if not items:
        raise ConfigError("panel_figure: no items to plot; expected at least one.")
    n = len(items)
    ncols = max(1, min(ncols, n, fit_columns(n, panel_size[0], max_width)))
    nrows = math.ceil(n / ncols)
    fig, axes = new_figure(nrows, ncols, size=(panel_size[0] * ncols, panel_size[1] * nrows), squeeze=False)
    flat: list[Axes] = list(np.ravel(axes))
    for ax, (name, value) in zip(flat, items.items()):
        plot(ax, value, title=str(name), **{**plot_kw, **(per_item or {}).get(name, {})})
    for ax in flat[n:]:
        ax.set_visible(False)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def show_figures_in_notebook() -> bool:
    """Make Jupyter display ``Figure`` objects as PNG (no pyplot involved); False outside IPython.

    IPython only registers a PNG formatter for matplotlib figures when pyplot
    is imported, so a ``Figure`` from :func:`new_figure` would print as text.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    if ip is None:
        return False
    ip.display_formatter.formatters["image/png"].for_type(Figure, figure_to_png_bytes)
    return True
