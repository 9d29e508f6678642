"""Plot functions: artists returned, labels set, baselines marked, no pyplot state, PNG out.

Each test draws on a figure from ``new_figure`` (no pyplot) and checks what a
reader would check: the numbers drawn are the numbers given, axes are labelled,
baselines sit where they should. pyplot is imported only to assert that nothing
registered a figure with it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.artist import Artist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Rectangle

from lora_lens.errors import ConfigError, ShapeError
from lora_lens.report import (
    figure_to_png_bytes, new_figure, panel_figure, plot_adapter_heatmap, plot_amplification, plot_condlora_grid,
    plot_effective_rank, plot_energy_curves, plot_intruder_counts, plot_intruder_sweep, plot_loss_curves,
    plot_phi_grid, plot_phi_heatmap, plot_projection_norms, plot_singular_values,
)
from lora_lens.report.figures import PNG_SIGNATURE

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)
L = 4
S = np.sort(RNG.random((L, 6)), axis=1)[:, ::-1] + 0.01  # (L, k) descending
PHI = np.clip(np.eye(L) + 0.2 * RNG.random((L, L)), 0, 1)
MODS = {"q_proj": RNG.random(L) * 4, "v_proj": RNG.random(L) * 4}


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """Nothing in the library may create pyplot figures (global state, GUI backends)."""
    import matplotlib.pyplot as plt  # only here: the library itself never imports pyplot

    before = plt.get_fignums()
    yield
    assert plt.get_fignums() == before == []


def _draw(plot, *args, size=(4, 3), **kw):
    fig, ax = new_figure(size=size)
    artists = plot(ax, *args, **kw)
    assert isinstance(artists, list) and artists and all(isinstance(a, Artist) for a in artists)
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
    png = figure_to_png_bytes(fig, dpi=40)
    assert png.startswith(PNG_SIGNATURE)
    return fig, ax, artists


def _colorbar_axes(fig, ax):
    return [a for a in fig.axes if a is not ax]


def _texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text") and isinstance(a, Artist)))


# ---------------------------------------------------------------- figures

def test_new_figure_is_headless_agg_and_png_is_deterministic():
    fig, axes = new_figure(2, 3, size=(6, 4))
    assert isinstance(fig, Figure) and isinstance(fig.canvas, FigureCanvasAgg)
    assert axes.shape == (2, 3)
    axes[0, 0].plot([1, 2, 3])
    a, b = figure_to_png_bytes(fig, dpi=30), figure_to_png_bytes(fig, dpi=30)
    assert a.startswith(PNG_SIGNATURE) and a == b
    with pytest.raises(ConfigError):
        new_figure(0, 1)


def test_figure_to_png_bytes_attaches_agg_to_a_bare_figure():
    fig = Figure(figsize=(2, 2))  # no canvas attached by the caller
    fig.subplots().plot([0, 1])
    assert figure_to_png_bytes(fig, dpi=20).startswith(PNG_SIGNATURE)


def test_panel_figure_one_panel_per_item_and_hides_the_rest():
    fig = panel_figure({"q_proj": PHI, "k_proj": PHI, "v_proj": PHI}, plot_phi_heatmap, ncols=2,
                       panel_size=(4.5, 4), baseline=0.1)
    main = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in main] == ["q_proj", "k_proj", "v_proj"]
    assert sum(not ax.get_visible() for ax in fig.axes) == 1
    assert figure_to_png_bytes(fig, dpi=30).startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------- spectra

def test_singular_values_one_line_per_layer_log_and_normalized():
    fig, ax, _ = _draw(plot_singular_values, S, normalize=True)
    lines = [l for l in ax.get_lines()]
    assert len(lines) == L
    for line, s in zip(lines, S):
        np.testing.assert_allclose(line.get_ydata(), s / s[0])
        np.testing.assert_array_equal(line.get_xdata(), np.arange(1, S.shape[1] + 1))
    assert ax.get_yscale() == "log"
    # depth colour bar ticked with the layer numbers
    (cax,) = _colorbar_axes(fig, ax)
    assert [t.get_text() for t in cax.get_yticklabels()] == [str(i) for i in range(L)]


def test_singular_values_ragged_mapping_and_torch_input():
    spectra = {3: torch.tensor([2.0, 1.0]), 7: np.array([3.0, 2.0, 1.0, 0.0])}  # a zero is masked on log
    fig, ax, _ = _draw(plot_singular_values, spectra, colorbar=False)
    assert [len(l.get_ydata()) for l in ax.get_lines()] == [2, 4]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["layer 3", "layer 7"]
    with pytest.raises(ShapeError):
        plot_singular_values(new_figure()[1], [[1.0, 0.5], []])
    with pytest.raises(ShapeError):
        plot_singular_values(new_figure()[1], S, layers=[0, 1])


def test_energy_curves_end_at_one_with_the_fraction_line():
    fig, ax, _ = _draw(plot_energy_curves, S, fraction=0.8)
    curves = ax.get_lines()[:L]
    for line, s in zip(curves, S):
        np.testing.assert_allclose(line.get_ydata(), np.cumsum(s ** 2) / np.sum(s ** 2))
        assert line.get_ydata()[-1] == pytest.approx(1.0)
    assert any(list(l.get_ydata()) == [0.8, 0.8] for l in ax.get_lines())
    assert "80% energy" in _texts(fig)


def test_effective_rank_bars_per_module_and_nominal_rank():
    fig, ax, artists = _draw(plot_effective_rank, MODS, layers=[0, 2, 4, 6], nominal_rank=8)
    bars = [a for a in artists if isinstance(a, Rectangle)]
    assert len(bars) == 2 * L
    np.testing.assert_allclose(sorted(b.get_height() for b in bars), sorted(np.concatenate(list(MODS.values()))))
    assert any(list(l.get_ydata()) == [8, 8] and l.get_linestyle() == "--" for l in ax.get_lines())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "4", "6"]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "q_proj" in legend and "nominal r = 8" in legend
    fig, ax, _ = _draw(plot_effective_rank, MODS["q_proj"], kind="line", nominal_rank={"a": 4, "b": 8},
                       metric="stable rank")
    assert ax.get_ylabel() == "stable rank" and len(ax.get_lines()) == 3
    with pytest.raises(ConfigError):
        plot_effective_rank(new_figure()[1], MODS, kind="pie")
    with pytest.raises(ShapeError):
        plot_effective_rank(new_figure()[1], {"q": [1, 2], "v": [1, 2, 3]})


# ---------------------------------------------------------------- similarity

def test_phi_heatmap_values_ticks_annotations_and_baseline():
    fig, ax, artists = _draw(plot_phi_heatmap, PHI, layers=[1, 3, 5, 7], baseline=0.125, title="q_proj")
    (img,) = [a for a in artists if isinstance(a, AxesImage)]
    np.testing.assert_array_equal(img.get_array(), PHI)
    assert img.norm.vmin == 0 and img.norm.vmax == 1
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1", "3", "5", "7"]
    cells = sorted(float(t.get_text()) for t in ax.texts if t.get_text().replace(".", "").isdigit())
    np.testing.assert_allclose(cells, np.sort(PHI.ravel()), atol=0.005)  # small grid: every cell annotated
    (cax,) = _colorbar_axes(fig, ax)
    assert any(list(l.get_ydata()) == [0.125, 0.125] for l in cax.get_lines())
    text = _texts(fig)
    assert "random baseline φ = 0.125" in text
    off = PHI[~np.eye(L, dtype=bool)].mean()
    assert f"mean off-diagonal φ = {off:.3g}" in text
    fig, ax, _ = _draw(plot_phi_heatmap, PHI, annotate=False, scale="log")
    assert len(ax.texts) == 1  # only the note under the title
    with pytest.raises(ShapeError):
        plot_phi_heatmap(new_figure()[1], np.zeros((2, 3)))
    with pytest.raises(ConfigError):
        plot_phi_heatmap(new_figure()[1], PHI, scale="cubic")


def test_large_heatmap_thins_layer_ticks_and_skips_annotations():
    big = RNG.random((32, 32))
    fig, ax, _ = _draw(plot_phi_heatmap, big, baseline=0.01)
    assert len(ax.texts) == 1  # only the note under the title
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[0] == "0" and 8 <= len(labels) <= 16


def test_adapter_heatmap_rows_modules_and_per_module_baselines():
    values = RNG.random((2, L))
    fig, ax, artists = _draw(plot_adapter_heatmap, values, ["q_proj", "v_proj"], baseline={"q_proj": 0.1, "v_proj": 0.2},
                             labels=("seed 0", "seed 1"))
    rows = [t.get_text() for t in ax.get_yticklabels()]
    assert rows == ["q_proj\n(random 0.1)", "v_proj\n(random 0.2)"]
    assert ax.get_title() == "φ(seed 0, seed 1) per layer"
    (img,) = [a for a in artists if isinstance(a, AxesImage)]
    np.testing.assert_array_equal(img.get_array(), values)
    fig, ax, _ = _draw(plot_adapter_heatmap, values, ["q", "v"], baseline=[0.3, 0.3])  # equal → one bar line
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q", "v"]
    with pytest.raises(ShapeError):
        plot_adapter_heatmap(new_figure()[1], values, ["q"])
    with pytest.raises(ShapeError):
        plot_adapter_heatmap(new_figure()[1], values, ["q", "v"], baseline={"q": 0.1})


def test_phi_grid_i_on_y_j_on_x_one_based():
    grid = RNG.random((8, 64))
    fig, ax, artists = _draw(plot_phi_grid, grid, labels=("A (r=8)", "A (r=64)"), baseline=64 / 512)
    (img,) = [a for a in artists if isinstance(a, AxesImage)]
    assert img.get_array().shape == (8, 64)
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(1, 9)]
    xt = [t.get_text() for t in ax.get_xticklabels()]
    assert xt[0] == "1" and xt[-1] == "64"
    assert ax.get_ylabel().startswith("i") and ax.get_xlabel().startswith("j")
    assert "A (r=8)" in ax.get_title() and "A (r=64)" in ax.get_title()


def test_condlora_grid_marks_both_baselines():
    struct = np.full((L, L), 0.05)
    fig, ax, _ = _draw(plot_condlora_grid, PHI, gaussian_baseline=0.02, structure_baseline=struct, factor="C_B",
                       module="value", scale="sqrt")
    (cax,) = _colorbar_axes(fig, ax)
    marks = sorted(l.get_ydata()[0] for l in cax.get_lines())
    assert marks == pytest.approx([0.02, 0.05])
    text = _texts(fig)
    assert "Gaussian 0.02" in text and "W0⁻¹G (structure-aware) 0.05" in text
    assert "C_B" in ax.get_title() and "value" in ax.get_title()


# ---------------------------------------------------------------- alignment, intruders

def test_projection_norms_three_bars_per_layer_log():
    d, o, r = np.full(L, 0.3), np.full(L, 21.7), np.full(L, 0.02)
    fig, ax, artists = _draw(plot_projection_norms, d, o, r, rank=4, delta_norm=np.full(L, 6.9))
    bars = [a for a in artists if isinstance(a, Rectangle)]
    assert len(bars) == 3 * L
    assert sorted({round(b.get_height(), 3) for b in bars}) == [0.02, 0.3, 21.7]
    assert ax.get_yscale() == "log"
    assert any(l.get_label() == r"$\|\Delta W\|_F$" for l in ax.get_lines())
    assert "r = 4" in ax.get_title()
    with pytest.raises(ShapeError):
        plot_projection_norms(new_figure()[1], d, o, r[:2])


def test_amplification_and_intruder_counts():
    fig, ax, artists = _draw(plot_amplification, MODS)
    assert sum(isinstance(a, Rectangle) for a in artists) == 2 * L
    counts = {"q_proj": [0, 1, 2, 3], "v_proj": [1, 0, 0, 1]}
    fig, ax, artists = _draw(plot_intruder_counts, counts, k=10, eps=0.5)
    assert ax.get_ylim() == (0, 10)
    assert "ε = 0.5" in ax.get_title()
    assert "total 8" in _texts(fig)


def test_intruder_sweep_lines_and_chosen_eps():
    eps = np.linspace(0.1, 0.9, 5)
    fig, ax, _ = _draw(plot_intruder_sweep, eps, {"a": [0, 1, 2, 4, 8], "b": [0, 0, 1, 2, 3]}, chosen_eps=0.5)
    lines = ax.get_lines()
    np.testing.assert_allclose(lines[0].get_xdata(), eps)
    assert any(list(l.get_xdata()) == [0.5, 0.5] for l in lines)
    with pytest.raises(ShapeError):
        plot_intruder_sweep(new_figure()[1], eps, [1, 2])


# ---------------------------------------------------------------- training

def test_loss_curves_runs_eval_and_knots():
    runs = {
        "LoRA": {"train_loss": np.linspace(3, 1, 50), "eval_steps": [25, 50], "eval_loss": [2.0, 1.2]},
        "COLA": {"train_steps": np.arange(0, 100, 2), "train_loss": np.linspace(3, 0.9, 50), "knots": [30, 60]},
    }
    fig, ax, artists = _draw(plot_loss_curves, runs, smooth=0.5)
    lines = ax.get_lines()
    knots = [l for l in lines if l.get_linestyle() == ":"]
    assert sorted(l.get_xdata()[0] for l in knots) == [30, 60]
    evals = [l for l in lines if l.get_linestyle() == "--"]
    assert len(evals) == 1 and list(evals[0].get_xdata()) == [25, 50]
    assert len(ax.get_legend().get_texts()) == 3  # the style key: train, eval, knot
    assert sum(1 for a in ax.artists if a.__class__.__name__ == "Legend") == 1  # and the runs legend kept
    np.testing.assert_array_equal(lines[0].get_ydata(), runs["LoRA"]["train_loss"])  # raw under the smoothed
    with pytest.raises(ConfigError, match="trian_loss"):
        plot_loss_curves(new_figure()[1], {"x": {"trian_loss": [1.0]}})
    with pytest.raises(ShapeError):
        plot_loss_curves(new_figure()[1], {"x": {"train_steps": [1, 2], "train_loss": [1.0]}})
    with pytest.raises(ConfigError):
        plot_loss_curves(new_figure()[1], {})


# ---------------------------------------------------------------- house rule

def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names += [f"{node.module or ''}.{a.name}" for a in node.names]
    return names


def test_only_report_imports_matplotlib_and_never_pyplot():
    """The library outside lora_lens/report/ and the CLI never import matplotlib; report never imports pyplot."""
    report = ROOT / "lora_lens" / "report"
    offenders = []
    for path in [*(ROOT / "lora_lens").rglob("*.py"), *(ROOT / "cli").rglob("*.py")]:
        names = _imports(path)
        if path.is_relative_to(report):
            offenders += [f"{path.name}: {n}" for n in names if "pyplot" in n]
        else:
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "matplotlib"]
    assert offenders == []


def test_sample_report_uses_every_plot_without_pyplot():
    from lora_lens.report.sample import sample_report

    report = sample_report(seed=1)
    figures = [f.figure for s in report.sections for f in s.figures]
    assert len(figures) == 9 and all(isinstance(f, Figure) for f in figures)


def _tick_texts(fig: Figure) -> set[str]:
    """Every tick label drawn on the figure's axes, colour bars included."""
    return {t.get_text() for ax in fig.axes for axis in (ax.xaxis, ax.yaxis) for t in axis.get_ticklabels()}


def test_report_figures_name_unet_blocks_as_the_tables_do(tmp_path):
    """A UNet block's index is a position code (2010200): the report's figures label it by its block name
    (shortened to fit a tick), as the CLI's tables and the JSON's block_name do (spectra, effective rank,
    layer φ, adapter pair)."""
    from safetensors.torch import save_file

    from lora_lens import analyze_adapters, load_adapter
    from lora_lens.report.analysis import analysis_report

    stems = {"down_blocks_0_attentions_0": "unet.down_blocks.0.attentions.0.transformer_blocks.0",
             "mid_block_attentions_0": "unet.mid_block.attentions.0.transformer_blocks.0",
             "up_blocks_1_attentions_2": "unet.up_blocks.1.attentions.2.transformer_blocks.0"}
    adapters = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        t = {}
        for s in stems:
            stem = f"lora_unet_{s}_transformer_blocks_0_attn1_to_q"
            t[f"{stem}.lora_down.weight"] = torch.randn(4, 32, generator=g)
            t[f"{stem}.lora_up.weight"] = torch.randn(32, 4, generator=g)
        save_file(t, tmp_path / f"unet{seed}.safetensors")
        adapters.append(load_adapter(tmp_path / f"unet{seed}.safetensors"))
    report = analysis_report(analyze_adapters(adapters))
    figures = {f.name: f.figure for sec in report.sections for f in sec.figures}
    for name in ("spectra-unet0.safetensors-attn1.to_q", "effrank-unet0.safetensors",
                 "phi-layers-unet0.safetensors", "pair-unet0.safetensors-unet1.safetensors"):
        ticks = _tick_texts(figures[name])
        assert {"down.0.attn.0.tb.0", "mid.attn.0.tb.0", "up.1.attn.2.tb.0"} <= ticks, (name, ticks)
        assert not ticks & {"1000000", "2010200"}, (name, ticks)


def test_analyze_adapters_takes_paths_as_adapter_spectra_does(llama_adapter, tiny_llama):
    """``analyze_adapters(["./my-adapter"], base="./model")`` (what users type after adapter_spectra("./x")) runs the
    same analyses as with loaded objects; before, a path failed with AttributeError: 'str' object has no 'label'."""
    from lora_lens import analyze_adapters, load_adapter, open_base

    by_path = analyze_adapters([str(llama_adapter[1])], base=str(tiny_llama[1])).to_dict()
    by_object = analyze_adapters([load_adapter(llama_adapter[1])], base=open_base(tiny_llama[1])).to_dict()
    assert by_path == by_object and by_path["adapters"][0]["alignment"] is not None


def _overlaps(boxes):
    return [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


def test_metric_vs_parameters_labels_never_collide():
    """The report's size (7 × 4.5 in): x tick labels apart, methods with one parameter count dodged apart, every
    method in the legend, nothing outside the figure (the old labels overlapped and cora-init was cut off)."""
    from lora_lens.report import plot_metric_vs_parameters

    params = {"lora": 77578, "cora-frozen": 40714, "cora-init": 77578, "condlora": 16138, "lora-sp": 40711,
              "chain": 77578, "head-only": 3850}
    rng = np.random.default_rng(0)
    fig, ax, _ = _draw(plot_metric_vs_parameters, {m: {"parameters": p, "values": list(0.5 + 0.05 * rng.random(3))}
                                                   for m, p in params.items()}, size=(7, 4.5))
    figure_to_png_bytes(fig, dpi=100)  # lay out at the report's dpi (_draw rendered at 40)
    renderer = fig.canvas.get_renderer()
    shown = [t for t in ax.get_xticklabels() if t.get_visible() and t.get_text()
             and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]]  # labels outside the view are not drawn
    ticks = [t.get_window_extent(renderer) for t in shown]
    assert len(ticks) >= 3 and not _overlaps(ticks)
    means = [line for line in ax.lines if line.get_markersize() == 7]
    xs = sorted(float(line.get_xdata()[0]) for line in means)
    assert len(xs) == 7 and all(b / a > 1.03 for a, b in zip(xs, xs[1:]))  # lora, cora-init, chain dodged apart
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(params)
    fig_box = fig.bbox
    for artist in (ax.get_legend(), ax.xaxis.label, ax.yaxis.label, *shown):
        box = artist.get_window_extent(renderer)
        assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1 and box.y0 >= fig_box.y0 - 1, artist


def test_intruder_sweep_label_fits_the_report_panel():
    from lora_lens.report.alignment_plots import plot_intruder_sweep

    fig, (ax1, ax) = new_figure(1, 2, size=(12, 4))  # the report's intruder figure
    plot_intruder_sweep(ax, [0.1, 0.5, 0.9], {"q": np.array([0, 9, 58]), "v": np.array([0, 8, 60])}, k=10)
    figure_to_png_bytes(fig, dpi=100)
    box = ax.yaxis.label.get_window_extent(fig.canvas.get_renderer())
    assert box.y0 >= fig.bbox.y0 and box.y1 <= fig.bbox.y1 and box.x0 >= fig.bbox.x0
