"""Helpers the plot modules share: input checks, layer ticks, colours, colour bars, baselines.

Everything here works on one ``Axes`` and its ``Figure`` (``ax.figure``); nothing
touches pyplot, so plots render headless and leave no global state behind.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib import colormaps, rcParams
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.colorbar import Colorbar
from matplotlib.colors import BoundaryNorm, ListedColormap, Normalize
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from ..errors import ShapeError

#: What every ``plot_*`` function returns: the artists it created.
Artists = list[Artist]

#: Baseline colours and line styles, in order (first: the Gaussian / random baseline).
BASELINE_STYLES = (("#d62728", "--"), ("#ff7f0e", ":"), ("#7f7f7f", "-."))


def as_array(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """``x`` (numpy, list, or a torch tensor on any device) as a float64 numpy array."""
    if hasattr(x, "detach"):  # a torch tensor: no torch import needed here
        x = x.detach().cpu().double().numpy()
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ShapeError(f"{name}: could not read as a numeric array ({e}); pass numbers, a numpy array or a tensor.") from None
    if ndim is not None and a.ndim != ndim:
        raise ShapeError(f"{name}: got shape {a.shape}; expected a {ndim}-D array.")
    if a.size == 0:
        raise ShapeError(f"{name}: is empty; expected at least one value.")
    return a


def as_rows(values: Any, name: str) -> tuple[list[np.ndarray], list | None]:
    """One 1-D array per layer from ``(L, k)``, a list of 1-D arrays (ragged ok) or ``{layer: array}``.

    Returns the rows and, for a mapping, its keys (the layer labels).
    """
    keys = None
    if isinstance(values, Mapping):
        keys = list(values.keys())
        items = list(values.values())
    elif isinstance(values, (list, tuple)):
        items = list(values)
    else:
        a = as_array(values, name)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise ShapeError(f"{name}: got shape {a.shape}; expected (L, k) or a list of 1-D arrays.")
        items = list(a)
    if not items:
        raise ShapeError(f"{name}: no layers given; expected at least one.")
    rows = [as_array(v, f"{name}[{i}]", ndim=1) for i, v in enumerate(items)]
    return rows, keys


def as_series(values: Any, name: str, length: int | None = None) -> dict[str, np.ndarray]:
    """``{label: (L,)}`` from a mapping, or a single ``(L,)`` array (label ``""``); lengths checked."""
    series = dict(values) if isinstance(values, Mapping) else {"": values}
    if not series:
        raise ShapeError(f"{name}: no series given; expected at least one.")
    out = {str(k): as_array(v, f"{name}[{k!r}]", ndim=1) for k, v in series.items()}
    lengths = {k: len(v) for k, v in out.items()}
    want = length if length is not None else next(iter(lengths.values()))
    bad = {k: n for k, n in lengths.items() if n != want}
    if bad:
        raise ShapeError(f"{name}: series lengths {bad} differ from {want}; give one value per layer for every series.")
    return out


def layer_labels(layers: Sequence | None, L: int, name: str = "layers") -> list:
    """Tick labels for ``L`` layers: ``layers`` as given, else ``0 … L-1``."""
    if layers is None:
        return list(range(L))
    labels = list(layers)
    if len(labels) != L:
        raise ShapeError(f"{name}: {len(labels)} labels for {L} layers; give one label per layer.")
    return labels


#: Short forms of diffusers path parts for tick labels (a full block path is ~50 characters).
_SHORT_PARTS = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up", "attentions": "attn",
                "resnets": "res", "transformer_blocks": "tb", "single_transformer_blocks": "single",
                "downsamplers": "downsample", "upsamplers": "upsample"}


def block_labels(blocks: Sequence, names: Sequence[str | None] | None = None) -> list:
    """Layer labels for plots: a block's name where it has one, else its index.

    A diffusion UNet/DiT block's index is a position code (2010200, see
    :func:`lora_lens.keys.parse_diffusion_path`), so it is labelled by its
    name, shortened to fit a tick: ``unet.up_blocks.1.attentions.2.transformer_blocks.0``
    → ``up.1.attn.2.tb.0`` (the model prefix dropped, :data:`_SHORT_PARTS`).
    """
    names = list(names or ())
    names += [None] * (len(blocks) - len(names))
    return [short_block_name(n) if n else b for b, n in zip(blocks, names)]


def short_block_name(name: str) -> str:
    """``unet.up_blocks.1.attentions.2.transformer_blocks.0`` → ``up.1.attn.2.tb.0`` (see :func:`block_labels`)."""
    parts = name.split(".")
    start = next((i for i, p in enumerate(parts) if p in _SHORT_PARTS), 0)
    return ".".join(_SHORT_PARTS.get(p, p) for p in parts[start:])


#: Slant of long x tick labels (degrees).
_SLANT = 35


def fitting_ticks(ax: Axes, axis: str, labels: Sequence[str], slant: bool = False) -> int:
    """How many of ``labels`` fit along ``axis`` of ``ax`` without touching (at least 2).

    Measured before layout, on the axes' share of the figure less 20 % for what
    constrained layout will take from it (tick labels, colour bars). A label takes
    its width (0.6 em a character) plus a gap along x, its line height along y, and
    slanted, the spacing whose perpendicular distance is one line height.
    """
    box = ax.get_position()
    length = 0.8 * (box.width * ax.figure.get_figwidth() if axis == "x" else box.height * ax.figure.get_figheight())
    size = FontProperties(size="small" if slant else rcParams[f"{axis}tick.labelsize"]).get_size_in_points()
    line = 1.4 * size / 72
    if axis != "x":
        need = line
    elif slant:
        need = line / math.sin(math.radians(_SLANT))
    else:
        need = max(map(len, labels), default=1) * 0.6 * size / 72 + 0.1
    return max(2, int(length / need))


def set_layer_ticks(ax: Axes, axis: str, labels: Sequence, max_ticks: int = 16) -> None:
    """Ticks at positions ``0 … L-1`` labelled with the layers' labels; thinned to what fits.

    Long labels (block names) on the x axis are slanted; at most ``max_ticks``
    and at most :func:`fitting_ticks` labels are kept (40 UNet block names under a
    2.5-in heatmap ran into one another at 14).
    """
    names = [str(x) for x in labels]
    slant = axis == "x" and max(map(len, names), default=0) > 8
    fit = fitting_ticks(ax, axis, names, slant)
    step = max(1, math.ceil(len(labels) / min(max_ticks, fit)))
    pos = list(range(0, len(labels), step))
    text = [names[p] for p in pos]
    if axis == "x":
        ax.set_xticks(pos, text, **(dict(rotation=_SLANT, ha="right", rotation_mode="anchor", fontsize="small")
                                    if slant else {}))
    else:
        ax.set_yticks(pos, text)


def depth_colours(L: int, cmap: str = "viridis") -> tuple[list, ListedColormap, BoundaryNorm]:
    """``L`` colours from shallow to deep, and a discrete colormap/norm for a colour bar."""
    base = colormaps[cmap]
    colours = [base(x) for x in (np.linspace(0.0, 0.9, L) if L > 1 else [0.0])]
    listed = ListedColormap(colours)
    norm = BoundaryNorm(np.arange(L + 1) - 0.5, L)
    return colours, listed, norm


def module_colours(names: Sequence[str]) -> dict[str, Any]:
    """A stable colour per series name (tab10 order)."""
    tab = colormaps["tab10"]
    return {n: tab(i % 10) for i, n in enumerate(names)}


def add_colorbar(ax: Axes, mappable, label: str, fig=None) -> Colorbar:
    """A colour bar beside ``ax`` on ``fig`` (default ``ax.figure``), labelled."""
    fig = ax.figure if fig is None else fig
    cb = fig.colorbar(mappable, ax=ax, fraction=0.05, pad=0.02, aspect=30)
    cb.set_label(label)
    return cb


def depth_colorbar(ax: Axes, labels: Sequence, cmap: ListedColormap, norm: BoundaryNorm, fig=None) -> Colorbar:
    """A discrete colour bar for lines coloured by layer depth, ticked with layer numbers."""
    from matplotlib.cm import ScalarMappable

    cb = add_colorbar(ax, ScalarMappable(norm=norm, cmap=cmap), "layer", fig=fig)
    step = max(1, math.ceil(len(labels) / 12))
    pos = list(range(0, len(labels), step))
    cb.set_ticks(pos, labels=[str(labels[p]) for p in pos])
    cb.ax.minorticks_off()
    return cb


def baseline_items(baseline: float | Mapping[str, float] | None, default_label: str = "random") -> list[tuple[str, float]]:
    """``[(label, value), …]`` from a number, ``{label: number}`` or ``None``."""
    if baseline is None:
        return []
    items = baseline.items() if isinstance(baseline, Mapping) else [(default_label, baseline)]
    out = []
    for label, v in items:
        a = as_array(v, f"baseline {label!r}")
        out.append((str(label), float(np.mean(a))))  # a per-cell baseline is summarized by its mean
    return out


def baseline_note(items: Sequence[tuple[str, float]]) -> str:
    """``"baseline: random φ = 0.031"`` / ``"baselines: Gaussian 0.021 · structure-aware 0.027"``."""
    if not items:
        return ""
    if len(items) == 1:
        label, v = items[0]
        return f"{label} baseline φ = {v:.3g}"
    return "baselines: " + " · ".join(f"{label} {v:.3g}" for label, v in items)


def mark_baselines(cb: Colorbar, items: Sequence[tuple[str, float]]) -> Artists:
    """A line across the colour bar at each baseline, tagged on its left (styles: :data:`BASELINE_STYLES`).

    The tag is the label up to any " (", e.g. "W0⁻¹G (structure-aware)" → "W0⁻¹G";
    the sub-title carries the full label and value.
    """
    out: Artists = []
    vertical = cb.orientation == "vertical"
    shown = [(label, v, style) for (label, v), style in zip(items, BASELINE_STYLES)
             if cb.norm.vmin <= v <= cb.norm.vmax]
    pos = [float(cb.norm(v)) for _, v, _ in shown]
    order = np.argsort(pos)
    align = ["center"] * len(shown)
    for a, b in zip(order[:-1], order[1:]):  # two tags closer than ~6 % of the bar: push them apart
        if pos[b] - pos[a] < 0.06:
            align[a], align[b] = "top", "bottom"
    for (label, v, (colour, ls)), va in zip(shown, align):
        tag = label.split(" (")[0]
        if vertical:
            line = cb.ax.axhline(v, color=colour, ls=ls, lw=2.0)
            text = cb.ax.annotate(tag, xy=(0, v), xycoords=cb.ax.get_yaxis_transform(), xytext=(-3, 0),
                                  textcoords="offset points", ha="right", va=va, fontsize="x-small", color=colour)
        else:
            line = cb.ax.axvline(v, color=colour, ls=ls, lw=2.0)
            text = cb.ax.annotate(tag, xy=(v, 1), xycoords=cb.ax.get_xaxis_transform(), xytext=(0, 3),
                                  textcoords="offset points", ha="center", va="bottom", fontsize="x-small",
                                  color=colour)
        line.set_label(label)
        out += [line, text]
    return out


def _axes_width_inches(ax: Axes) -> float:
    """The width ``ax`` has in its figure before layout (its grid cell less the default margins)."""
    return ax.get_position().width * ax.figure.get_figwidth()


def wrap_note(note: str, width_in: float, fontsize: float = 8.33) -> str:
    """``note`` broken into lines that fit ``width_in`` inches at ``fontsize`` points.

    Breaks at the `` · `` between items first (``q_proj 11 · v_proj 6`` never splits
    inside an item), then at spaces within an item longer than a line. A character
    is taken as 0.6 em wide (DejaVu Sans digits and lower case are 0.55–0.63).
    """
    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    out = []
    for para in note.split("\n"):
        line = ""
        for item in para.split(" · "):
            joined = f"{line} · {item}" if line else item
            if len(joined) <= chars or not line:
                line = joined
            else:
                out.append(line)
                line = item
            if len(line) > chars:
                parts = textwrap.wrap(line, chars, break_long_words=False, break_on_hyphens=False) or [line]
                out += parts[:-1]
                line = parts[-1]
        out.append(line)
    return "\n".join(out)


def fit_axis_labels(ax: Axes) -> None:
    """Break an x or y label longer than its axis into lines that fit (at spaces; measured before layout).

    A y label naming two adapters ("i  (top-i directions of llama2-7b-alpaca-seed0 (r=8))")
    is longer than a 3.4-in figure is tall: constrained layout cannot shrink text, so both
    ends were cut off.
    """
    box = ax.get_position()
    # an x label may overhang its axes a little; a y label loses height to the title and its note
    for label, length in ((ax.xaxis.label, box.width * ax.figure.get_figwidth()),
                          (ax.yaxis.label, 0.8 * box.height * ax.figure.get_figheight())):
        text = label.get_text()
        chars = max(12, int(length * 72 / (0.6 * label.get_fontsize())))
        if len(text) > chars and "\n" not in text:
            label.set_text("\n".join(textwrap.wrap(text, chars, break_long_words=False, break_on_hyphens=False)))


def set_titles(ax: Axes, title: str, note: str = "") -> Artists:
    """The title and, under it, a small grey note (baselines, summary numbers) of one or more lines.

    The note is wrapped to the axes' width (:func:`wrap_note`): one line of seven
    module types' totals was wider than its panel, and constrained layout shrank the
    axes to a sliver to make room for it.
    """
    if not note:
        ax.set_title(title)
        return [ax.title]
    note = wrap_note(note, _axes_width_inches(ax))
    lines = note.count("\n") + 1
    t = ax.annotate(note, xy=(0.5, 1.0), xycoords="axes fraction", xytext=(0, 4), textcoords="offset points",
                    ha="center", va="bottom", fontsize="small", color="#444444")
    ax.set_title(title, pad=8 + 12 * lines)
    return [ax.title, t]


def series_legend(ax: Axes, inside: int = 3, **kw) -> Artist | None:
    """The legend of ``ax``: inside (best corner) for up to ``inside`` entries, else outside on the right.

    Seven module types' entries inside a bar chart covered a third of the bars; on the
    right they take their own space (constrained layout narrows the axes), never the data's.
    """
    labels = ax.get_legend_handles_labels()[1]
    if not labels:
        return None
    if len(labels) <= inside:
        return ax.legend(fontsize="small", **kw)
    return ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def annotate_cells(ax: Axes, values: np.ndarray, norm: Normalize, fmt: str = "{:.2f}", fontsize=None) -> Artists:
    """Write each cell's value in it; white on dark cells, black on light ones."""
    rows, cols = values.shape
    size = fontsize or max(5.0, min(9.0, 90.0 / max(rows, cols)))
    out: Artists = []
    for i in range(rows):
        for j in range(cols):
            v = values[i, j]
            if not np.isfinite(v):
                continue
            dark = float(norm(np.clip(v, norm.vmin, norm.vmax))) < 0.55  # viridis/magma: low values are dark
            out.append(ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=size,
                               color="white" if dark else "black"))
    return out


def grouped_bars(ax: Axes, series: Mapping[str, np.ndarray], colours: Mapping[str, Any], width: float = 0.8,
                 default_label: str = "", log: bool = False, **bar_kw) -> Artists:
    """One bar group per position ``0 … L-1``, one bar per series (side by side, same colours as elsewhere).

    ``log``: a log y axis, set *before* drawing so bars keep a visible bottom
    (bars start at 0, which a log axis would otherwise mask), with plain-number
    tick labels (``0.5, 1, 2, 5`` rather than ``5×10⁻¹``).
    """
    if log:
        ax.set_yscale("log", nonpositive="clip")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    w = width / len(series)
    x = np.arange(len(next(iter(series.values()))))
    bars = [ax.bar(x - width / 2 + w * (i + 0.5), v, w, color=colours[name], label=name or default_label, **bar_kw)
            for i, (name, v) in enumerate(series.items())]
    return bar_artists(bars)


def bar_artists(containers) -> Artists:
    """The Rectangle patches of one or more ``BarContainer`` objects (containers are not artists)."""
    out: Artists = []
    for c in containers:
        out.extend(c.patches)
    return out
