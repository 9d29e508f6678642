"""Training loss curves: several runs overlaid, train and eval, Chain-of-LoRA knots.

A run is a plain mapping (what a trainer log holds)::

    {"train_steps": (N,), "train_loss": (N,),     # required: train_loss
     "eval_steps": (E,), "eval_loss": (E,),       # optional
     "knots": [step, …]}                          # optional: COLA merge points

Missing ``*_steps`` default to ``1 … N``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator
from matplotlib.lines import Line2D

from ..errors import ConfigError, ShapeError
from ._axes import Artists, as_array, module_colours

RUN_KEYS = {"train_steps", "train_loss", "eval_steps", "eval_loss", "knots"}


def ema(y: np.ndarray, smooth: float) -> np.ndarray:
    """Exponential moving average ``m_t = smooth·m_{t-1} + (1-smooth)·y_t`` (``smooth`` in [0, 1))."""
    out = np.empty_like(y)
    m = y[0]
    for t, v in enumerate(y):
        m = smooth * m + (1.0 - smooth) * v
        out[t] = m
    return out


def _xy(run: Mapping[str, Any], name: str, which: str) -> tuple[np.ndarray, np.ndarray] | None:
    if f"{which}_loss" not in run:
        return None
    y = as_array(run[f"{which}_loss"], f"runs[{name!r}][{which}_loss]", ndim=1)
    steps = run.get(f"{which}_steps")
    x = np.arange(1, len(y) + 1, dtype=float) if steps is None else as_array(steps, f"runs[{name!r}][{which}_steps]", 1)
    if len(x) != len(y):
        raise ShapeError(f"runs[{name!r}]: {len(x)} {which}_steps for {len(y)} {which}_loss values; give one step per value.")
    return x, y


def plot_loss_curves(ax: Axes, runs: Mapping[str, Mapping[str, Any]], *, log: bool = False, smooth: float = 0.0,
                     title: str | None = None) -> Artists:
    """Train loss (solid), eval loss (dashed, markers) and knots (dotted verticals) for every run.

    Runs share one colour each. ``smooth`` > 0 draws the raw train loss faintly
    under its moving average. Two legends beside the axes: runs by colour, and the line styles.
    """
    if not runs:
        raise ConfigError("plot_loss_curves: no runs given; expected {name: {train_loss: …}}.")
    bad = {name: sorted(set(run) - RUN_KEYS) for name, run in runs.items() if set(run) - RUN_KEYS}
    missing = [name for name, run in runs.items() if "train_loss" not in run and "eval_loss" not in run]
    if bad or missing:
        raise ConfigError(f"plot_loss_curves: unknown keys {bad}, runs without a loss {missing}; "
                          f"expected keys among {sorted(RUN_KEYS)}.")
    if not 0.0 <= smooth < 1.0:
        raise ConfigError(f"plot_loss_curves: smooth={smooth}; expected a number in [0, 1).")
    colours = module_colours([str(n) for n in runs])
    out: Artists = []
    has_eval = has_knots = False
    for name, run in runs.items():
        c = colours[str(name)]
        train = _xy(run, name, "train")
        if train is not None:
            x, y = train
            if smooth > 0:
                out += ax.plot(x, y, color=c, lw=0.8, alpha=0.25)
                y = ema(y, smooth)
            out += ax.plot(x, y, color=c, lw=1.6, label=str(name))
        ev = _xy(run, name, "eval")
        if ev is not None:
            has_eval = True
            out += ax.plot(*ev, color=c, lw=1.4, ls="--", marker="o", ms=4)
        knots = run.get("knots")
        if knots is not None and len(knots):
            has_knots = True
            for k in as_array(knots, f"runs[{name!r}][knots]", ndim=1):
                out.append(ax.axvline(k, color=c, ls=":", lw=1.2, alpha=0.9))
    if log:
        ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole: no "0.5, 1.5" ticks on short runs
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    # Both legends beside the axes (runs at the top, line styles at the bottom): inside, at fixed corners,
    # they covered eval points and the lines of short or rising runs in compare-methods' panels.
    runs_legend = ax.legend(handles=[Line2D([], [], color=colours[str(n)], lw=2) for n in runs],
                            labels=[str(n) for n in runs], title="run", fontsize="small", loc="upper left",
                            bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    out.append(runs_legend)
    style = [("train", Line2D([], [], color="k", lw=1.6))]
    if has_eval:
        style.append(("eval", Line2D([], [], color="k", ls="--", marker="o", ms=4)))
    if has_knots:
        style.append(("knot (merge)", Line2D([], [], color="k", ls=":")))
    if len(style) > 1:
        ax.add_artist(runs_legend)  # a second ax.legend() call would replace the first
        # add_artist clips to the axes, and constrained layout skips artists clipped to the axes: the legend
        # beside the axes would get no room and be cut at the figure's edge.
        runs_legend.set_clip_on(False)
        out.append(ax.legend(handles=[h for _, h in style], labels=[s for s, _ in style], fontsize="small",
                             loc="lower left", bbox_to_anchor=(1.01, 0.0), borderaxespad=0.0))
    ax.set_title(title or "Training loss")
    return out
