"""Plots and the HTML report; the only part of lora_lens that imports matplotlib.

Every ``plot_*`` function draws on an ``Axes`` it is given and returns the
artists it created; inputs are plain (numpy arrays, lists, ``{name: array}``
mappings, labels), so any analysis result can be plotted. Figures are built
with :func:`new_figure` (``Figure`` + Agg canvas, no pyplot) and rendered with
:func:`figure_to_png_bytes`; :func:`write_report` writes a :class:`Report`
(typed sections, figures, tables) as a self-contained HTML page, the PNGs and
``results.json``. Nothing here computes an analysis: :mod:`lora_lens.analysis` does.
"""

from .analysis import write_analysis_report
from .collection import COLLECTION_JSON, collection_section, read_collection, write_collection
from .alignment_plots import plot_amplification, plot_intruder_counts, plot_intruder_sweep, plot_projection_norms
from .figures import figure_to_png_bytes, new_figure, panel_figure, show_figures_in_notebook
from .html import Report, ReportFigure, ReportSection, ReportTable, render_html, write_report
from .method_plots import plot_metric_vs_parameters
from .similarity_plots import plot_adapter_heatmap, plot_condlora_grid, plot_phi_grid, plot_phi_heatmap
from .spectra_plots import plot_effective_rank, plot_energy_curves, plot_singular_values
from .training_plots import plot_loss_curves

__all__ = [
    "COLLECTION_JSON", "collection_section", "read_collection", "write_analysis_report", "write_collection",
    "Report", "ReportFigure", "ReportSection", "ReportTable", "figure_to_png_bytes", "new_figure", "panel_figure",
    "plot_adapter_heatmap",
    "plot_amplification", "plot_condlora_grid", "plot_effective_rank", "plot_energy_curves",
    "plot_intruder_counts", "plot_intruder_sweep", "plot_loss_curves", "plot_metric_vs_parameters",
    "plot_phi_grid", "plot_phi_heatmap",
    "plot_projection_norms", "plot_singular_values", "render_html", "show_figures_in_notebook",
    "write_report",
]
