"""Report figures as a reader sees them: measured text boxes after layout, at the sizes the report uses.

Defects found by looking at real reports in Chromium (issue 21 §2): figures too wide for the page column
(shrunk to 46 %), a sub-title note that squeezed its axes to a sliver, legends over the bars, and the
collection map's names drawn over one another. Each test renders at a low dpi and measures the boxes.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.text import Text

from lora_lens.report import figure_to_png_bytes, new_figure, panel_figure, plot_phi_heatmap
from lora_lens.report._axes import wrap_note
from lora_lens.report.alignment_plots import plot_amplification, plot_intruder_counts, plot_intruder_sweep
from lora_lens.report.figures import MAX_FIGURE_WIDTH

TYPES = ["mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
         "self_attn.q_proj", "self_attn.v_proj"]
LAYERS = 28


def _render(fig, dpi=60):
    figure_to_png_bytes(fig, dpi=dpi)
    return fig.canvas.get_renderer()


def _inside(box, outer, tol=1.0) -> bool:
    return (box.x0 >= outer.x0 - tol and box.x1 <= outer.x1 + tol and box.y0 >= outer.y0 - tol
            and box.y1 <= outer.y1 + tol)


def _overlaps(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def _everything_inside(fig, renderer):
    """Every visible axes (ticks, labels, titles, notes, legends, colour bars) lies inside the figure."""
    bad = [ax for ax in fig.axes if ax.get_visible() and not _inside(ax.get_tightbbox(renderer), fig.bbox)]
    assert not bad, [(a.get_title(), a.get_tightbbox(renderer), fig.bbox) for a in bad]


def _shown_xticks(ax, renderer):
    lo, hi = sorted(ax.get_xlim())
    return [t.get_window_extent(renderer) for t in ax.get_xticklabels()
            if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]


def test_wrap_note_breaks_between_items_to_the_width():
    note = "total 1934  (" + " · ".join(f"{t} {270 + i}" for i, t in enumerate(TYPES)) + ")"
    wrapped = wrap_note(note, width_in=4.0)
    lines = wrapped.split("\n")
    chars = int(4.0 * 72 / (0.6 * 8.33))
    assert len(lines) >= 3 and all(len(line) <= chars for line in lines)
    assert wrapped.replace("\n", " · ") == note  # only the separators between items became line breaks
    assert wrap_note("short · note", 4.0) == "short · note"


def test_intruder_figure_with_seven_module_types_keeps_its_axes_and_labels():
    """The report's intruder figure (12 × 4 in) for a 28-layer model with 7 module types: the one-line total
    of 7 types made constrained layout squeeze the bars to a 2-in sliver, clipped the note and the sweep's
    title and x label, and ran the layer ticks together; both legends (7–8 entries) covered the data."""
    rng = np.random.default_rng(0)
    counts = {t: rng.integers(0, 11, LAYERS) for t in TYPES}
    eps = np.linspace(0.1, 0.9, 9)
    sweep = {t: np.sort(rng.integers(0, 280, 9)) for t in TYPES}
    fig, (ax1, ax2) = new_figure(1, 2, size=(12, 4))
    plot_intruder_counts(ax1, counts, k=10, eps=0.5)
    plot_intruder_sweep(ax2, eps, sweep, chosen_eps=0.5, k=10)
    renderer = _render(fig)
    _everything_inside(fig, renderer)
    for ax in (ax1, ax2):
        assert ax.bbox.width >= 0.25 * fig.bbox.width  # the data keeps a quarter of the figure each
        ticks = _shown_xticks(ax, renderer)
        assert len(ticks) >= 5 and not _overlaps(ticks)
        legend = ax.get_legend().get_window_extent(renderer)
        assert not legend.overlaps(ax.bbox), "a legend of many entries sits beside the axes, not over the data"
    assert not ax1.title.get_window_extent(renderer).overlaps(ax2.title.get_window_extent(renderer))


def test_small_legends_stay_inside_and_many_go_beside_the_axes():
    fig, (a, b) = new_figure(1, 2, size=(11, 4))
    plot_amplification(a, {t: np.ones(6) for t in TYPES[:2]})
    plot_amplification(b, {t: np.ones(6) for t in TYPES})
    renderer = _render(fig)
    box = a.get_legend().get_window_extent(renderer)
    assert a.bbox.contains((box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2)
    assert not b.get_legend().get_window_extent(renderer).overlaps(b.bbox)
    _everything_inside(fig, renderer)


def test_panel_grids_fit_the_report_column():
    """Seven φ panels asked for in 3 columns of 5.2 in (15.6 in, shown at 64 % in the page) come in 2 columns."""
    phi = np.eye(LAYERS)
    fig = panel_figure({t: phi for t in TYPES}, plot_phi_heatmap, ncols=3, panel_size=(5.2, 4.5))
    assert fig.get_figwidth() <= MAX_FIGURE_WIDTH
    shown = [ax for ax in fig.axes if ax.get_visible() and ax.images]
    assert len(shown) == len(TYPES)
    wide = panel_figure({t: phi for t in TYPES[:3]}, plot_phi_heatmap, ncols=3, panel_size=(5.2, 4.5),
                        max_width=None)
    assert wide.get_figwidth() == pytest.approx(15.6)  # the limit can be lifted for a standalone PNG


def test_analysis_report_figures_fit_the_page_and_their_text_fits_them(llama_adapter, tiny_llama):
    """A real report (PEFT adapter on tiny Llama, with its base): every figure at most MAX_FIGURE_WIDTH wide
    (the alignment grid of 3 module types + amplification was 4 × 5.5 = 22 in), nothing drawn outside it."""
    from lora_lens import analyze_adapters
    from lora_lens.report.analysis import analysis_report

    report = analysis_report(analyze_adapters([str(llama_adapter[1])], base=str(tiny_llama[1])))
    figures = [f.figure for sec in report.sections for f in sec.figures]
    assert len(figures) >= 5
    for fig in figures:
        assert fig.get_figwidth() <= MAX_FIGURE_WIDTH, fig.axes[0].get_title()
        _everything_inside(fig, _render(fig, dpi=40))


def test_collection_map_names_of_near_points_do_not_overprint():
    """Near-duplicates sit on one spot of the MDS map: their names are joined into one label, not stacked."""
    from lora_lens.report.collection import plot_map

    rng = np.random.default_rng(0)
    centres = np.array([[-0.4, 0.3], [0.5, 0.0], [-0.1, -0.5], [0.2, 0.6]])
    groups = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    coords = centres[groups] + 1e-3 * rng.standard_normal((len(groups), 2))
    names = [f"a{i:02d}" for i in range(len(groups))]
    fig, ax = new_figure(size=(6.5, 5.5))  # the collection report's map
    plot_map(ax, coords, groups, names, outliers=[12])
    renderer = _render(fig, dpi=80)
    labels = [t for t in ax.texts if isinstance(t, Text) and t.get_text()]
    assert sorted(", ".join(t.get_text().split("\n")) for t in labels)[0].startswith("a00, a01, a02, a03")
    assert " ".join(t.get_text() for t in labels).replace("\n", " ").replace(",", "").split() == names
    assert not _overlaps([t.get_window_extent(renderer) for t in labels])


def test_loss_curve_legends_sit_beside_the_data():
    """compare-methods' loss panels (4.8 × 4 in): the run and line-style legends used to sit at fixed corners
    inside the axes, over the eval points of short runs; now beside the axes, apart from each other, and the
    first (wider: long run names) no longer cut at the figure's edge."""
    from lora_lens.report import plot_loss_curves

    runs = {name: {"train_loss": [0.6945 - 0.0005 * s, 0.6935, 0.693 + 0.0003 * s],
                         "eval_steps": [0, 3], "eval_loss": [0.6942 - 0.003 * s, 0.6928],
                         "knots": [1, 2]} for s, name in enumerate(["LoRA", "CoRA (frozen B, seed 1)", "chain"])}
    fig = panel_figure({"lora": runs, "chain": runs}, plot_loss_curves, ncols=4, panel_size=(4.8, 4.0))
    renderer = _render(fig, dpi=100)  # measured at the dpi it was laid out at
    _everything_inside(fig, renderer)
    for ax in (a for a in fig.axes if a.get_visible()):
        legends = [a for a in ax.get_children() if a.__class__.__name__ == "Legend"]
        boxes = [lg.get_window_extent(renderer) for lg in legends]
        assert len(boxes) == 2 and not _overlaps(boxes)
        assert all(_inside(b, fig.bbox) for b in boxes), (boxes, fig.bbox)  # the first is not in tightbbox
        assert not any(b.overlaps(ax.bbox) for b in boxes)
        steps = [x for x in ax.get_xticks() if ax.get_xlim()[0] <= x <= ax.get_xlim()[1]]
        assert len(steps) >= 2 and all(float(x).is_integer() for x in steps)  # no "0.5, 1.5" steps


UNET_BLOCKS = ([f"down.{d}.attn.{a}.tb.{t}" for d in (1, 2) for a in (0, 1) for t in range(2 if d == 1 else 5)]
               + [f"mid.attn.0.tb.{t}" for t in range(5)]
               + [f"up.{u}.attn.{a}.tb.{t}" for u in (0, 1) for a in (0, 1, 2) for t in range(5 if u == 0 else 2)])


@pytest.mark.parametrize("labels", [UNET_BLOCKS, list(range(LAYERS))], ids=["unet-blocks", "28-layers"])
def test_layer_ticks_are_thinned_to_what_fits(labels):
    """φ between layers for 40 UNet blocks, two panels as in the report: the slanted block names under a 2.5-in
    heatmap ran into one another (14 of them); now as many as fit, on both axes, and none outside the figure."""
    rng = np.random.default_rng(0)
    phi = rng.random((len(labels), len(labels)))
    fig = panel_figure({"attn1.to_q": phi, "attn2.to_k": phi}, plot_phi_heatmap, ncols=3, panel_size=(5.2, 4.5),
                       layers=labels)
    renderer = _render(fig, dpi=100)
    _everything_inside(fig, renderer)
    for ax in (a for a in fig.axes if a.images):
        ticks = _shown_xticks(ax, renderer)
        rows = [t.get_window_extent(renderer) for t in ax.get_yticklabels() if t.get_text()]
        assert len(ticks) >= 5 and len(rows) >= 5
        # slanted boxes are axis-aligned hulls that overlap even when the text does not: compare their
        # baselines' spacing with the text height instead (perpendicular distance = spacing · sin 35°)
        if ticks[0].height > 2 * rows[0].height:
            gaps = np.diff(sorted(b.x1 for b in ticks)) * np.sin(np.radians(35))
            assert gaps.min() >= rows[0].height * 0.9, gaps
        else:
            assert not _overlaps(ticks)
        assert not _overlaps(rows)


def test_adapter_grid_axis_labels_with_long_adapter_names_fit_the_figure():
    """The report's φ(i, j) figure (8 × 3.4 in) names both adapters in its axis labels: with real adapter names
    the y label was taller than the figure and lost both ends; now it is broken into lines that fit."""
    from lora_lens.report._axes import fit_axis_labels
    from lora_lens.report.similarity_plots import plot_phi_grid

    fig, ax = new_figure(size=(8, 3.4))
    plot_phi_grid(ax, np.random.default_rng(0).random((8, 8)), baseline=0.01,
                  labels=("llama2-7b-alpaca-lora-seed0 (r=8)", "llama2-7b-alpaca-lora-seed1 (r=8)"))
    fit_axis_labels(ax)
    renderer = _render(fig, dpi=100)
    _everything_inside(fig, renderer)
    assert "llama2-7b-alpaca-lora-seed0" in ax.get_ylabel() and "\n" in ax.get_ylabel()
    assert "\n" not in ax.get_xlabel()  # the x axis is long enough for its label
