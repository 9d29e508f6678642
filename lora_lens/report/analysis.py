"""The report of an :class:`~lora_lens.analysis.Analysis` (``lora-lens report``): figures, tables, sections.

:func:`lora_lens.analysis.analyze_adapters` computes; here the results are only
drawn: :func:`analysis_report` builds the typed :class:`~lora_lens.report.html.Report`
and :func:`write_analysis_report` writes the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from ..analysis import AdapterAnalysis, Analysis
from ..compare.baselines import DEEPER_HALF
from ..compare.similarity import AdapterSimilarity, LayerGrid
from ..compare.subspaces import side_note
from ._axes import block_labels, fit_axis_labels
from .alignment_plots import plot_amplification, plot_intruder_counts, plot_intruder_sweep, plot_projection_norms
from .figures import MAX_FIGURE_WIDTH, fit_columns, new_figure, panel_figure
from .html import Report, ReportFigure, ReportSection, ReportTable, write_report
from .similarity_plots import plot_adapter_heatmap, plot_phi_grid, plot_phi_heatmap
from .spectra_plots import plot_effective_rank, plot_energy_curves, plot_singular_values
from .training_plots import plot_loss_curves


def _spectra_section(a: AdapterAnalysis, energy: float) -> ReportSection:
    sp = a.spectra
    types = list(sp.summary)
    figs = []
    for t in types:
        reps = [r for r in sp.layers if r.module_type == t]
        blocks = block_labels([r.block if r.block is not None else i for i, r in enumerate(reps)],
                              [r.block_name for r in reps])
        S = [r.singular_values.numpy() for r in reps]
        fig, (ax1, ax2) = new_figure(1, 2, size=(11, 3.8))
        if any(s.max() > 0 for s in S):
            plot_singular_values(ax1, S, blocks, title=f"{t}: singular values of ΔW per layer")
            plot_energy_curves(ax2, S, blocks, fraction=energy, title=f"{t}: energy kept at rank j")
        else:
            ax1.set_title(f"{t}: ΔW = 0 (untrained: B = 0)")
        figs.append(ReportFigure(fig, f"{a.adapter.label} · {t}: singular values and energy, coloured by depth.",
                                 f"spectra-{a.adapter.label}-{t}"))
    eff = {t: np.array([r.effective_rank for r in sp.layers if r.module_type == t]) for t in types}
    first = [r for r in sp.layers if r.module_type == types[0]]
    blocks = block_labels([r.block for r in first], [r.block_name for r in first])
    if all(len(v) == len(blocks) for v in eff.values()):
        fig, ax = new_figure(size=(8, 3.6))
        plot_effective_rank(ax, eff, blocks, nominal_rank={t: max(sp.summary[t].ranks) for t in types},
                            metric="effective rank exp(H(σ/Σσ))")
        figs.append(ReportFigure(fig, "Effective rank per layer; dashed: the nominal rank.",
                                 f"effrank-{a.adapter.label}"))
    rows = []
    for t, s in sp.summary.items():
        st = s.stats
        rows.append([t, s.layers, ",".join(map(str, sorted(set(s.ranks)))), st["effective_rank"]["mean"],
                     st["stable_rank"]["mean"], st["rank_at_energy"]["mean"], st["fro_norm"]["max"]])
    table = ReportTable(["module type", "layers", "rank", "eff. rank", "stable rank", f"rank @ {energy:g} energy",
                         "max ‖ΔW‖_F"], rows, f"Per module type (means over layers; energy fraction {energy})")
    return ReportSection(f"Spectra — {a.adapter.label}",
                         "Singular values of each layer's update ΔW = s·B·A, computed from the factors (QR + a small "
                         "SVD) without forming ΔW; effective rank is Roy & Vetterli's exp(entropy); the energy rank is "
                         "PEFT's convention (smallest j keeping the fraction of Σσ²).", figs, [table])


def _layer_similarity_section(a: AdapterAnalysis) -> ReportSection:
    grids = [g for g in a.layers.grids if len(g.blocks) > 1]
    if not grids:
        return ReportSection(f"Similarity across layers — {a.adapter.label}",
                             "Only one layer per module type: no grid.")
    fig = layer_similarity_figure(grids)
    rows = [[g.module_type, g.dim, max(g.ks), g.summary()["mean_offdiag"], g.summary()["random_mean_offdiag"],
             g.summary()["deep_mean_offdiag"]] for g in grids]
    table = ReportTable(["module type", "dim", "k", "φ", "random φ", "φ deeper half"], rows,
                        "Mean off-diagonal φ (all layers, and the deeper half) against the random baseline")
    return ReportSection(f"Similarity across layers — {a.adapter.label}",
                         "φ(i = j = r) = ‖U_aᵀ U_b‖²_F / r between the top singular vectors of ΔW of every pair "
                         "of layers of one module type (LoRA §7). The baseline is φ for random subspaces of the same "
                         f"dimensions. The deeper half is {DEEPER_HALF}. {side_note('delta', a.layers.side)}",
                         [ReportFigure(fig, "φ between layers, one panel per module type.",
                                       f"phi-layers-{a.adapter.label}")], [table])


def layer_similarity_figure(grids: Sequence[LayerGrid]) -> Figure:
    """One φ(layer, layer) panel per module type, each with *its own* layers and random baseline
    (the mean off-diagonal ``max(k_a, k_b)/d`` of that grid: GQA k/v have another d than q)."""
    items = {f"{g.module_type}: φ between layers (top-{max(g.ks)})": g for g in grids}
    per_item = {k: {"layers": block_labels(g.blocks, g.block_names),
                    "baseline": g.summary()["expected_mean_offdiag"]} for k, g in items.items()}
    return panel_figure({k: g.phi.numpy() for k, g in items.items()}, plot_phi_heatmap, ncols=min(3, len(items)),
                        panel_size=(5.2, 4.5), per_item=per_item)


def pair_similarity_figures(p: AdapterSimilarity) -> list[ReportFigure]:
    """Adapter vs adapter: the module type × layer φ heatmap (one baseline per module type) and the
    LoRA Figure 3 φ(i, j) grid of the middle module, with the per-cell baseline ``max(i, j)/d``."""
    figs = []
    types = list(p.by_module_type())
    blocks = sorted({m.key.block for m in p.modules if m.key.block is not None})
    if blocks:
        vals = np.full((len(types), len(blocks)), np.nan)
        baselines: dict[str, float] = {}
        for m in p.modules:
            baselines.setdefault(m.key.module, float(m.baseline.expected_phi))
            if m.key.block is not None:
                vals[types.index(m.key.module), blocks.index(m.key.block)] = m.phi
        fig, ax = new_figure(size=(min(MAX_FIGURE_WIDTH, max(6, 0.5 * len(blocks) + 3)), 1.0 + 0.6 * len(types) + 1.6))
        names = {m.key.block: m.key.block_name for m in p.modules}
        plot_adapter_heatmap(ax, vals, types, block_labels(blocks, [names[b] for b in blocks]),
                             baseline=baselines, labels=(p.a, p.b))
        figs.append(ReportFigure(fig, f"φ({p.a}, {p.b}) per layer and module type.", f"pair-{p.a}-{p.b}"))
    mid = p.modules[len(p.modules) // 2]
    fig, ax = new_figure(size=(8, 3.4))
    plot_phi_grid(ax, mid.grid.numpy(), labels=(f"{p.a} (r={mid.k_a})", f"{p.b} (r={mid.k_b})"),
                  baseline=mid.baseline.expected_grid.numpy(), title=f"φ(i, j): {mid.name} (as LoRA Figure 3)")
    fit_axis_labels(ax)  # the y label names an adapter: longer than the 3.4-in figure is tall for long names
    figs.append(ReportFigure(fig, f"φ(i, j) for i ≤ {mid.k_a}, j ≤ {mid.k_b} on {mid.name}.", f"grid-{p.a}-{p.b}"))
    return figs


def _pairs_section(pairs: Sequence[AdapterSimilarity]) -> ReportSection:
    figs, rows = [], []
    for p in pairs:
        figs += pair_similarity_figures(p)
        s = p.summary()
        rows.append([p.a, p.b, len(p.modules), s.get("phi"), s.get("random_phi"), s.get("expected_phi")])
    table = ReportTable(["a", "b", "modules", "φ", "random φ", "expected φ"], rows, "Mean φ over matched modules")
    return ReportSection("Adapter vs adapter",
                         "The same module in two adapters (two seeds, two tasks, two ranks): φ at i = j = the pair's "
                         "smaller rank (the number `lora-lens similarity` and `collection` give), and the LoRA §7.2 "
                         f"φ(i, j) grid for one layer. {side_note('delta', pairs[0].side)}", figs, [table])


def _alignment_section(a: AdapterAnalysis, epsilon: float, k: int) -> ReportSection:
    al, intr = a.alignment.alignment, a.alignment.intruders
    types = list(dict.fromkeys(m.key.module for m in al.modules))
    first = [m for m in al.modules if m.key.module == types[0]]
    blocks = block_labels([m.key.block for m in first], [m.key.block_name for m in first])
    figs = []
    # one projection-norm panel per module type, then the amplification factors of all of them
    n = len(types) + 1
    ncols = fit_columns(n, 5.5)  # two 5.5-in panels a row: four were 22 in, shrunk to 46 % in the page
    nrows = -(-n // ncols)
    fig, axes = new_figure(nrows, ncols, size=(5.5 * ncols, 4 * nrows), squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    axes = axes[:n]
    for ax, t in zip(axes, types):
        mods = [m for m in al.modules if m.key.module == t]
        plot_projection_norms(ax, [m.proj_delta for m in mods], [m.proj_w0 for m in mods],
                              [m.proj_random for m in mods],
                              block_labels([m.key.block for m in mods], [m.key.block_name for m in mods]),
                              rank=mods[0].rank,
                              delta_norm=[m.delta_norm for m in mods], title=f"{t}: W0 on three direction sets")
    amp = {t: np.array([m.amplification for m in al.modules if m.key.module == t]) for t in types}
    if all(len(v) == len(blocks) for v in amp.values()):
        plot_amplification(axes[-1], amp, blocks)
    figs.append(ReportFigure(fig, "‖U_rᵀ W0 V_r‖_F for ΔW's, W0's own and random top-r directions, and the "
                                  "amplification factor ‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F (LoRA §7.3).",
                             f"alignment-{a.adapter.label}"))
    ie = list(intr.epsilons).index(epsilon)
    counts = {t: np.array([m.counts[ie] for m in intr.modules if m.key.module == t]) for t in types}
    if all(len(v) == len(blocks) for v in counts.values()):
        fig, (ax1, ax2) = new_figure(1, 2, size=(12, 4))
        plot_intruder_counts(ax1, counts, blocks, k=k, eps=epsilon)
        sweep = {t: np.array([sum(m.counts[i] for m in intr.modules if m.key.module == t)
                              for i in range(len(intr.epsilons))]) for t in types}
        plot_intruder_sweep(ax2, list(intr.epsilons), sweep, chosen_eps=epsilon, k=k)
        figs.append(ReportFigure(fig, f"Intruder dimensions among the top-{k} singular vectors of W0 + ΔW "
                                      f"(ε = {epsilon}), and the total as ε varies.", f"intruders-{a.adapter.label}"))
    rows = [[t, float(np.mean(amp[t])), int(sum(m.counts[ie] for m in intr.modules if m.key.module == t))]
            for t in types]
    table = ReportTable(["module type", "amplification", "intruders"], rows,
                        f"Per module type: mean amplification, intruder dimensions (k = {k}, ε = {epsilon})")
    return ReportSection(f"Alignment with W0 — {a.adapter.label}",
                         "Does ΔW amplify directions W0 already has (LoRA §7.3), and does it bring new ones "
                         "(intruder dimensions, Shuttleworth et al. 2024)?", figs, [table])


def _span(xs: Sequence[float], fmt: str = ".2f") -> str:
    """``1.4`` or ``1.4–2.1``: one number, or the range over adapters."""
    xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "—"
    lo, hi = format(min(xs), fmt), format(max(xs), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _findings(an: Analysis, energy: float) -> list[str]:
    """The few things a reader should take away, as sentences, most important first (one per topic, ≤ 5).

    Which modules changed most, the rank the adapters really used, whether
    layers (and adapters) share directions beyond a random baseline, and how
    ΔW sits against W0. With several adapters a sentence gives the range over
    them; the numbers per adapter and module type are in :func:`_summary_tables`.
    """
    out = []
    many = len(an.adapters) > 1
    tops = []  # per adapter: its modules by ‖ΔW‖_F, largest first, and the median
    for a in an.adapters:
        rows = sorted((r for r in a.spectra.layers if r.fro_norm > 0), key=lambda r: -r.fro_norm)
        if rows:
            tops.append((a.adapter.label, rows, float(np.median([r.fro_norm for r in rows]))))
    if len(tops) == 1:
        _, rows, med = tops[0]
        names = [f"{r.name} ({r.fro_norm:.3g})" for r in rows[:3]]
        out.append(f"The largest updates ‖ΔW‖_F are in {', '.join(names)}: up to {rows[0].fro_norm / med:.1f}× "
                   f"the median module's {med:.3g}.")
    elif tops and len({rows[0].name for _, rows, _ in tops}) == 1:
        out.append(f"The largest update is in {tops[0][1][0].name} in {'both' if len(tops) == 2 else f'all {len(tops)}'} adapters, "
                   f"{_span([rows[0].fro_norm / med for _, rows, med in tops], '.1f')}× the median module's ‖ΔW‖_F.")
    elif tops:
        out.append("The largest update differs between the adapters: " + "; ".join(
            f"{label}: {rows[0].name} ({rows[0].fro_norm / med:.1f}× the median module)" for label, rows, med in tops[:3])
            + ("; …" if len(tops) > 3 else "") + ".")
    per_type = [(t, s) for a in an.adapters for t, s in a.spectra.summary.items()]
    if per_type:
        eff = {}
        for t, s in per_type:
            eff.setdefault(t, []).append(s.stats["effective_rank"]["mean"])
        types = ", ".join(f"{t} {_span(v, '.1f')}" for t, v in list(eff.items())[:4]) + (", …" if len(eff) > 4 else "")
        nominal = _span([max(s.ranks) for _, s in per_type], ".0f")
        out.append(f"{'The adapters' if many else 'The adapter'} used an effective rank of "
                   f"{_span([x for v in eff.values() for x in v], '.1f')} of {'their' if many else 'its'} nominal "
                   f"r = {nominal} ({types}); {energy:.0%} of the energy sits in the top "
                   f"{_span([s.stats['rank_at_energy']['mean'] for _, s in per_type], '.1f')} directions.")
    grids = {}
    for a in an.adapters:
        for g in a.layers.grids:
            if len(g.blocks) > 1:
                grids.setdefault(g.module_type, []).append(g.summary())
    if grids:
        t, ss = max(grids.items(), key=lambda kv: np.nanmean([s["mean_offdiag"] or np.nan for s in kv[1]]))
        phi, rnd = [s["mean_offdiag"] for s in ss], [s["random_mean_offdiag"] for s in ss]
        ratio = [x / r for x, r in zip(phi, rnd) if x is not None and r]
        out.append(f"Across layers, {t} updates share the most directions: mean off-diagonal φ {_span(phi, '.3f')} "
                   f"against {_span(rnd, '.3f')} for random subspaces of the same ranks "
                   f"({_span(ratio, '.1f')}× the baseline).")
    if an.pairs:
        ss = [p.summary() for p in an.pairs]
        phi, rnd = [s.get("phi") for s in ss], [s.get("random_phi") for s in ss]
        who = f"{an.pairs[0].a} and {an.pairs[0].b}" if len(an.pairs) == 1 else f"the {len(an.pairs)} adapter pairs"
        out.append(f"Between adapters, {who} learned subspaces with φ {_span(phi, '.3f')} against "
                   f"{_span(rnd, '.3f')} for random ones, on {_span([len(p.modules) for p in an.pairs], '.0f')} "
                   "matched modules.")
    aligned = [a for a in an.adapters if a.alignment is not None]
    if aligned:
        amp = [float(np.mean([m.amplification for m in a.alignment.alignment.modules])) for a in aligned]
        ie = [list(a.alignment.intruders.epsilons).index(an.epsilon) for a in aligned]
        n_intr = [sum(m.counts[i] for m in a.alignment.intruders.modules) for a, i in zip(aligned, ie)]
        out.append(f"Against the base, the mean amplification factor ‖ΔW‖_F / ‖UᵀW0V‖_F (LoRA §7.3) is "
                   f"{_span(amp)}, and ΔW brings {_span(n_intr, '.0f')} intruder dimension(s) in all, among each "
                   f"module's top {an.intruder_k} directions (ε = {an.epsilon}).")
    return out[:5]


def _summary_tables(an: Analysis, energy: float) -> list[ReportTable]:
    """Per adapter and module type: ranks, norms, cross-layer φ against random; adapter pairs: φ against random."""
    rows = []
    for a in an.adapters:
        grids = {g.module_type: g.summary() for g in a.layers.grids if len(g.blocks) > 1}
        for t, s in a.spectra.summary.items():
            st, g = s.stats, grids.get(t, {})
            rows.append((a.adapter.label, t, s.layers, max(s.ranks), st["effective_rank"]["mean"],
                         st["rank_at_energy"]["mean"], st["fro_norm"]["max"], g.get("mean_offdiag"),
                         g.get("random_mean_offdiag")))
    tables = [ReportTable(("adapter", "module type", "layers", "r", "effective rank", f"rank @ {energy:.0%} energy",
                           "max ‖ΔW‖_F", "cross-layer φ", "random φ"), rows,
                          "Per module type, means over its layers (φ: mean off-diagonal of the layers × layers grid).")]
    if an.pairs:
        pr = [(p.a, p.b, len(p.modules), (s := p.summary()).get("phi"), s.get("random_phi")) for p in an.pairs]
        tables.append(ReportTable(("adapter", "adapter", "matched modules", "φ", "random φ"), pr,
                                  "Adapter pairs: mean φ over matched modules."))
    return tables


def _summary(an: Analysis, energy: float = 0.9) -> tuple[list[str], list[ReportTable], list[tuple[str, Any]]]:
    """Findings as sentences first, then the tables behind them, then what was analyzed."""
    table = [("adapters", ", ".join(a.adapter.label for a in an.adapters)), ("base", an.base or "—"),
             ("modules", ", ".join(str(len(a.adapter)) for a in an.adapters))]
    return _findings(an, energy), _summary_tables(an, energy), table


def analysis_report(an: Analysis, title: str = "lora_lens report", energy: float = 0.9,
                    extra_sections: Sequence[ReportSection] = ()) -> Report:
    """The :class:`~lora_lens.report.html.Report` of an :class:`Analysis` (``extra_sections`` appended)."""
    sections = []
    for a in an.adapters:
        sections.append(_spectra_section(a, energy))
        sections.append(_layer_similarity_section(a))
        if a.alignment is not None:
            sections.append(_alignment_section(a, an.epsilon, an.intruder_k))
    if an.pairs:
        sections.append(_pairs_section(an.pairs))
    if an.runs:
        fig, ax = new_figure(size=(9, 4))
        plot_loss_curves(ax, an.runs, smooth=0.6)
        sections.append(ReportSection("Training", "Train loss (smoothed, raw underneath), eval loss, Chain-of-LoRA "
                                      "knots.", [ReportFigure(fig, "Loss curves.", "loss")]))
    sections += list(extra_sections)
    labels = ", ".join(a.adapter.label for a in an.adapters)
    bullets, tables, table = _summary(an, energy)
    return Report(title, f"adapters: {labels}" + (f" · base: {an.base}" if an.base else ""), bullets, table,
                  sections, summary_tables=tables)


def write_analysis_report(
    out_dir: str | Path,
    analysis: Analysis,
    title: str = "lora_lens report",
    energy: float = 0.9,
    extra_sections: Sequence[ReportSection] = (),
    extra_json: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``out_dir/index.html`` + ``figures/*.png`` + ``results.json`` for an :class:`Analysis`; returns index.html."""
    report = analysis_report(analysis, title, energy, extra_sections)
    return write_report(out_dir, report, json_data={**analysis.to_dict(), **(extra_json or {})},
                        overwrite=overwrite)
