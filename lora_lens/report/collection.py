"""A collection's folder and its report section: clustered heatmap, 2-D map, shared-basis energy curves.

:func:`write_collection` writes ``collection.json`` (everything, numbers
only), ``collection.safetensors`` (the ``(N, N)`` matrices and each module's
left/right φ) and ``report/`` (``index.html`` + ``figures/*.png``), atomically.
:func:`collection_section` builds the HTML section from the plain
``collection.json`` data, so ``lora-lens report`` can show a collection
folder without recomputing anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes

from ..errors import CheckpointError
from ..io.atomic import atomic_directory, atomic_save_safetensors
from ..io.jsonfile import read_json
from ._axes import Artists, add_colorbar
from .figures import new_figure
from .html import Report, ReportFigure, ReportSection, ReportTable, write_report

COLLECTION_JSON = "collection.json"
COLLECTION_TENSORS = "collection.safetensors"
#: Above this many adapters, names are left off the axes and the map.
MAX_NAMED = 40


def plot_dendrogram(ax: Axes, linkage: np.ndarray, orientation: str = "top") -> Artists:
    """SciPy's dendrogram coordinates drawn as lines (no pyplot); leaves at ``0.5, 1.5, …`` to match a heatmap."""
    from scipy.cluster.hierarchy import dendrogram

    d = dendrogram(np.asarray(linkage, dtype=float), no_plot=True)
    out: Artists = []
    for xs, ys in zip(d["icoord"], d["dcoord"]):
        xs = np.asarray(xs) / 10.0 - 0.5  # SciPy puts leaf i at 10·i + 5
        line = ax.plot(ys, xs, color="0.3", lw=0.8) if orientation == "left" else ax.plot(xs, ys, color="0.3", lw=0.8)
        out += line
    ax.set_axis_off()
    return out


def plot_clustered_heatmap(fig, phi: np.ndarray, linkage: np.ndarray, order: Sequence[int], names: Sequence[str],
                           random_phi: float | None = None) -> Artists:
    """φ with rows/columns in dendrogram order, the dendrogram above; draws into ``fig`` (two axes)."""
    gs = fig.add_gridspec(2, 1, height_ratios=(1, 4))
    top, ax = fig.add_subplot(gs[0]), fig.add_subplot(gs[1])
    out = plot_dendrogram(top, linkage)
    o = list(order)
    values = np.asarray(phi, dtype=float)[np.ix_(o, o)]
    img = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    top.set_xlim(-0.5, len(o) - 0.5)
    if len(o) <= MAX_NAMED:
        ax.set_xticks(range(len(o)), [names[i] for i in o], rotation=90, fontsize=7)
        ax.set_yticks(range(len(o)), [names[i] for i in o], fontsize=7)
    else:
        ax.set_xticks([]), ax.set_yticks([])
    cb = add_colorbar(ax, img, "φ", fig=fig)
    if random_phi is not None:
        cb.ax.axhline(random_phi, color="w", lw=1.2, ls="--")
        ax.set_title(f"φ, adapters in dendrogram order (random baseline {random_phi:.3f}, dashed)", fontsize=9)
    return out + [img, cb.ax]


def map_labels(coords: np.ndarray, names: Sequence[str], near: float = 0.04,
               per_line: int = 4) -> list[tuple[int, str]]:
    """One label per group of points closer than ``near`` × the map's extent: ``[(point index, text), …]``.

    Near-duplicates sit on one spot of the map; their names, drawn one over another,
    were unreadable. A group's names are joined (``per_line`` a line) at its first point.
    """
    c = np.asarray(coords, dtype=float)
    span = float(np.ptp(c, axis=0).max()) if len(c) else 0.0
    tol = near * span if span > 0 else 1e-12
    groups: list[list[int]] = []
    for i in range(len(c)):
        g = next((g for g in groups if np.hypot(*(c[g[0]] - c[i])) <= tol), None)
        if g is None:
            groups.append([i])
        else:
            g.append(i)
    out = []
    for g in groups:
        label = [str(names[i]) for i in g]
        lines = [", ".join(label[k:k + per_line]) for k in range(0, len(label), per_line)]
        out.append((g[0], "\n".join(lines)))
    return out


def plot_map(ax: Axes, coords: np.ndarray, clusters: Sequence[int], names: Sequence[str],
             outliers: Sequence[int] = ()) -> Artists:
    """The 2-D MDS map of ``1 − φ``, one colour per cluster, outliers ringed in red."""
    c = np.asarray(coords, dtype=float)
    sc = ax.scatter(c[:, 0], c[:, 1], c=list(clusters), cmap="tab10", s=28, vmin=0, vmax=9)
    out: Artists = [sc]
    if len(outliers):
        o = list(outliers)
        out.append(ax.scatter(c[o, 0], c[o, 1], s=120, facecolors="none", edgecolors="red", lw=1.5,
                              label="outlier"))
        ax.legend(loc="best", fontsize=8)
    if len(names) <= MAX_NAMED:
        out += [ax.annotate(text, tuple(c[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
                for i, text in map_labels(c, names)]
    ax.set_title("2-D map (MDS of 1 − φ), coloured by cluster", fontsize=9)
    ax.set_aspect("equal", adjustable="datalim")
    return out


def plot_energy_curves(ax: Axes, curves: np.ndarray, shared_rank: int | None, names: Sequence[str]) -> Artists:
    """Per adapter, the fraction of its ‖ΔW‖² the shared basis captures against R; the median bold."""
    y = np.asarray(curves, dtype=float)
    R = np.arange(1, y.shape[1] + 1)
    out: Artists = []
    for row in y:
        out += ax.plot(R, row, color="0.6", lw=0.7, alpha=0.7)
    out += ax.plot(R, np.median(y, axis=0), color="C0", lw=2, label="median adapter")
    if shared_rank:
        out.append(ax.axvline(shared_rank, color="C3", ls="--", lw=1, label=f"R = {shared_rank}"))
    ax.set_xlabel("shared rank R (per module)")
    ax.set_ylabel("captured fraction of ‖ΔW‖²")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Shared basis: ‖U_Rᵀ ΔW V_R‖² / ‖ΔW‖² per adapter", fontsize=9)
    return out


def collection_section(data: Mapping[str, Any]) -> ReportSection:
    """The report section from ``collection.json``'s data."""
    names = [a["label"] for a in data["adapters"]]
    st = data["structure"]
    phi = np.array(data["phi"], dtype=float)
    rnd = np.array(data["random_phi"], dtype=float)
    off = ~np.eye(len(names), dtype=bool)
    base = float(np.nanmean(rnd[off])) if off.any() else None
    figs = []
    fig = new_figure(size=(7.5, 8.5))[0]
    fig.clear()
    plot_clustered_heatmap(fig, phi, np.array(st["linkage"]), st["dendrogram_order"], names, base)
    side = data.get("side", "both")  # schema 1 (no "side") averaged both sides
    figs.append(ReportFigure(fig, f"Adapter × adapter φ (side {side}, mean over modules), clustered (average "
                             "linkage on 1 − φ).",
                             "collection-heatmap"))
    fig, ax = new_figure(size=(6.5, 5.5))
    outl = [names.index(o["adapter"]) for o in st["outliers"]]
    plot_map(ax, np.array(st["coords"]), st["clusters"]["labels"], names, outl)
    figs.append(ReportFigure(fig, "2-D map of the collection.", "collection-map"))
    sb = data["shared_basis"]
    if sb.get("curve_both"):
        fig, ax = new_figure(size=(6.5, 4.2))
        plot_energy_curves(ax, np.array(sb["curve_both"], dtype=float), data["settings"].get("shared_rank"), names)
        figs.append(ReportFigure(fig, "Shared-basis energy per adapter.", "collection-energy"))
    cl = st["clusters"]
    sil = "" if cl["silhouette"] is None else f", silhouette {cl['silhouette']:.2f}"
    text = [f"{len(names)} adapters, {len(data['modules'])} modules compared. {cl['n_clusters']} clusters "
            f"({cl['method']}{sil}); mean off-diagonal φ {np.nanmean(phi[off]):.3f} against a random baseline of "
            f"{base:.3f}." if base is not None else f"{len(names)} adapters."]
    if data.get("partial_modules"):
        text.append(f"{len(data['partial_modules'])} module(s) missing in some adapters were compared over the "
                    "adapters that have them.")
    text += [f"note: {n}" for n in data.get("notes", [])]
    at = sb.get("energy_both_at_rank") or [None] * len(names)
    rows = [[n, c, a.get("norm"), a.get("effective_rank"), e, next((x["nearest"] for x in st["nearest"]
             if x["adapter"] == n), None)] for n, c, a, e in zip(names, cl["labels"], data["adapters"], at)]
    tables = [ReportTable(["adapter", "cluster", "‖ΔW‖", "eff. rank", "energy at R", "nearest"], rows,
                          "Adapters: cluster, ‖ΔW‖, effective rank, shared-basis energy at R, nearest neighbour.")]
    if st["near_duplicates"]:
        tables.append(ReportTable(["a", "b", "φ"], [[d["a"], d["b"], d["phi"]] for d in st["near_duplicates"]],
                                  "Near-duplicates."))
    if st["outliers"]:
        tables.append(ReportTable(["adapter", "reasons"],
                                  [[o["adapter"], "; ".join(o["reasons"])] for o in st["outliers"]], "Outliers and why."))
    return ReportSection("Collection", text, figs, tables)


def read_collection(folder: str | Path) -> dict:
    """``collection.json`` of a collection folder."""
    p = Path(folder) / COLLECTION_JSON
    data = read_json(p, "a collection.json written by `lora-lens collection`")
    if not isinstance(data, dict) or data.get("kind") != "collection":
        raise CheckpointError(f"{p}: is not a lora_lens collection (no \"kind\": \"collection\").")
    return data


def write_collection(out_dir: str | Path, coll, structure, *, overwrite: bool = False,
                     title: str = "lora_lens collection") -> Path:
    """Write the collection folder (see the module docstring); returns ``out_dir``."""
    import torch

    data = {**coll.to_dict(), "structure": structure.to_dict(coll.labels)}
    tensors = {"phi": coll.phi.float(), "random_phi": coll.random_phi.float(), "common": coll.common.float()}
    tensors.update({f"by_type.{t}": v.float() for t, v in coll.by_type.items()})
    for m in coll.modules:
        tensors[f"modules.{m.name}.phi_out"] = m.phi_out.float()
        tensors[f"modules.{m.name}.phi_in"] = m.phi_in.float()
        tensors[f"modules.{m.name}.members"] = torch.tensor(m.members, dtype=torch.int64)
    report = Report(title, f"{coll.size} adapters", sections=[collection_section(data)])
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        (tmp / COLLECTION_JSON).write_text(text, encoding="utf-8")
        atomic_save_safetensors(tensors, tmp / COLLECTION_TENSORS, {"kind": "collection"})
        write_report(tmp / "report", report, json_data={"collection": COLLECTION_JSON})
    return Path(out_dir)
