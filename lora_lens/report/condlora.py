"""The CondLoRA conversion-matrix section of a report (docs/maths.md §5)."""

from __future__ import annotations

from ..compare.baselines import DEEPER_HALF
from ..methods.condlora_analysis import CondLoraAnalysis
from ._axes import block_labels
from .figures import new_figure
from .html import ReportFigure, ReportSection, ReportTable
from .similarity_plots import plot_condlora_grid


def condlora_section(analysis: CondLoraAnalysis) -> ReportSection:
    """Report section: one L×L φ heatmap per module type and side, both baselines marked, and a table."""
    figures, rows = [], []
    for g in analysis.grids:
        s = g.summary()
        if len(g.blocks) > 1:
            fig, ax = new_figure(size=(6, 5))
            plot_condlora_grid(ax, g.phi.numpy(), block_labels(g.blocks, g.block_names),
                               gaussian_baseline=s["gaussian_offdiag"],
                               structure_baseline=g.structural.numpy(), factor=f"C_{g.side}", module=g.module_type,
                               scale="sqrt")
            figures.append(ReportFigure(fig, f"{g.module_type}, C_{g.side}: φ between layers ({g.equation}).",
                                        f"condlora-{g.module_type}-{g.side}"))
        rows.append([g.module_type, f"C_{g.side}", s["phi_offdiag"], s["gaussian_offdiag"], s["structural_offdiag"],
                     s["phi_offdiag_deep"], s["residual_max"]])
    table = ReportTable(["module type", "side", "φ", "Gaussian", "W0⁻¹G (structure)", "φ deeper half", "max residual"],
                        rows, "Mean off-diagonal φ of the conversion matrices against both baselines")
    text = (f"Conversion matrices of {analysis.adapter}: W0·C_A = Aᵀ and W0·C_B = B per layer (exact solve for "
            "square W0, least squares otherwise, residual reported), compared across layers with φ on their left "
            "singular vectors (i = j = r). Two baselines: Gaussian matrices, and W0⁻¹G with the same W0 — "
            f"similarity that W0 alone explains, whatever the adapter learned. The deeper half is {DEEPER_HALF}.")
    return ReportSection("CondLoRA conversion matrices", text, figures, [table])
