"""Report baselines follow each panel's own dimensions (issue 11 §4d).

Random φ is ``max(i, j)/d``: it depends on the ambient dimension ``d`` of each
module type (GQA k/v project to fewer features than q) and, on the LoRA
Figure 3 grid, on ``i`` and ``j``. The figures are checked on their artists:
the baseline lines on each colour bar and the per-row labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_lens.compare import adapter_similarity
from lora_lens.compare.similarity import LayerGrid
from lora_lens.keys import parse_module_path
from lora_lens.report.analysis import layer_similarity_figure, pair_similarity_figures
from lora_lens.types import Adapter, LoraModule, LoraSettings

R = 4
DIMS = {"self_attn.q_proj": 32, "self_attn.k_proj": 16}  # GQA: k has half q's output features


def baseline_lines(fig, main_axes) -> list[list[float]]:
    """Per colour bar (in panel order), the y values of the baseline lines drawn on it."""
    bars = [a for a in fig.axes if a not in main_axes and a.get_visible()]
    return [sorted({float(l.get_ydata()[0]) for l in bar.get_lines()}) for bar in bars]


def grid(module_type: str, blocks) -> LayerGrid:
    d, L = DIMS[module_type], len(blocks)
    phi = torch.rand(L, L, generator=torch.Generator().manual_seed(L), dtype=torch.float64)
    return LayerGrid(module_type, tuple(blocks), tuple(f"model.layers.{b}.{module_type}" for b in blocks), d,
                     (R,) * L, phi, torch.full((L, L), R / d), torch.full((L, L), R / d, dtype=torch.float64))


def test_each_layer_panel_has_its_own_baseline_and_layers():
    """Before the fix every panel got the first grid's baseline (q's 0.125) and layers."""
    grids = [grid("self_attn.q_proj", [0, 1, 2, 3]), grid("self_attn.k_proj", [1, 3])]
    fig = layer_similarity_figure(grids)
    panels = [a for a in fig.axes if a.images]
    assert len(panels) == 2
    assert baseline_lines(fig, panels) == [[R / 32], [R / 16]]
    assert [t.get_text() for t in panels[1].get_xticklabels()] == ["1", "3"]


def adapter(seed: int, path: str) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    mods = []
    for b in range(2):
        for mt, m in DIMS.items():
            name = f"model.layers.{b}.{mt}"
            mods.append(LoraModule(name, parse_module_path(name), torch.randn(R, 32, generator=g),
                                   torch.randn(m, R, generator=g), alpha=R, scaling=1.0))
    return Adapter(Path(path), LoraSettings(r=R, lora_alpha=R), tuple(mods))


@pytest.fixture(scope="module")
def pair():
    return adapter_similarity(adapter(0, "a"), adapter(1, "b"), device="cpu")


def test_adapter_pair_heatmap_has_one_baseline_per_module_type(pair):
    fig = pair_similarity_figures(pair)[0].figure
    (ax,) = [a for a in fig.axes if a.images]
    rows = dict(t.get_text().rstrip(")").split("\n(random ") for t in ax.get_yticklabels())
    assert set(rows) == set(DIMS)
    for mt, d in DIMS.items():  # labels carry 2 significant digits
        assert float(rows[mt]) == pytest.approx(R / d, rel=0.05), mt


def test_phi_grid_gets_the_per_cell_baseline_max_i_j_over_d(pair):
    """Before the fix: one line at r/d; the grid max(i, j)/d runs from 1/d (i = j = 1) to r/d."""
    fig = pair_similarity_figures(pair)[1].figure
    (ax,) = [a for a in fig.axes if a.images]
    mid = pair.modules[len(pair.modules) // 2]
    assert baseline_lines(fig, [ax]) == [[1 / mid.dim, R / mid.dim]]
    text = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert "max(i, j)/d per cell" in text


def test_phi_grid_refuses_a_baseline_grid_of_another_shape():
    from lora_lens.errors import ShapeError
    from lora_lens.report import new_figure, plot_phi_grid

    with pytest.raises(ShapeError, match="baseline"):
        plot_phi_grid(new_figure()[1], np.zeros((4, 8)), baseline=np.zeros((4, 4)))
