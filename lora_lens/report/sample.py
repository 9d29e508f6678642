"""A sample report from synthetic, seeded data: every figure type once.

Used to look at the report (``scripts/screenshot_report.py``) and in tests. The
numbers only imitate real analyses (subspaces with a shared component across
layers, a decaying spectrum, the LoRA paper's projection-norm magnitudes); they
are not results.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .alignment_plots import plot_amplification, plot_intruder_counts, plot_intruder_sweep, plot_projection_norms
from .figures import new_figure, panel_figure
from .html import Report, ReportFigure, ReportSection, ReportTable
from .similarity_plots import plot_adapter_heatmap, plot_condlora_grid, plot_phi_grid, plot_phi_heatmap
from .spectra_plots import plot_effective_rank, plot_energy_curves, plot_singular_values
from .training_plots import plot_loss_curves

MODULES = ("q_proj", "v_proj")


def _orth(X: np.ndarray) -> np.ndarray:
    return np.linalg.qr(X)[0]


def _phi(Ux: np.ndarray, Uy: np.ndarray) -> float:
    return float(((Ux.T @ Uy) ** 2).sum() / min(Ux.shape[1], Uy.shape[1]))


def _phi_grid(Ux: np.ndarray, Uy: np.ndarray) -> np.ndarray:
    cum = ((Ux.T @ Uy) ** 2).cumsum(0).cumsum(1)  # (r1, r2)
    i, j = np.arange(1, cum.shape[0] + 1)[:, None], np.arange(1, cum.shape[1] + 1)[None, :]
    return cum / np.minimum(i, j)


def _effective_rank(s: np.ndarray) -> float:
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def sample_data(seed: int = 0, L: int = 6, r: int = 8, d: int = 128) -> dict[str, Any]:
    """Synthetic analysis results for ``L`` layers, module types q/v, rank ``r``, width ``d``."""
    rng = np.random.default_rng(seed)
    shared = {m: rng.standard_normal((d, r)) for m in MODULES}
    # Deeper layers share more of a common direction set: φ grows with depth.
    U = {m: [_orth(shared[m] * (0.3 + 0.25 * l) + rng.standard_normal((d, r))) for l in range(L)] for m in MODULES}
    U2 = {m: [_orth(U[m][l] @ rng.standard_normal((r, r)) * 2 + rng.standard_normal((d, r))) for l in range(L)]
          for m in MODULES}  # a second seed
    S = {m: np.array([(1.0 + 0.3 * l) * np.exp(-np.arange(r) / (1.5 + (0.4 + 0.3 * k) * l)) for l in range(L)])
         for k, m in enumerate(MODULES)}
    U8 = _orth(rng.standard_normal((d, 8)))
    U32 = _orth(np.hstack([U8[:, :3] * 3 + rng.standard_normal((d, 3)) * 0.5, rng.standard_normal((d, 29))]))
    steps = np.arange(1, 301)

    def loss(scale, knots=()):
        y = 2.2 * np.exp(-steps / (90 * scale)) + 0.9 + 0.05 * rng.standard_normal(len(steps))
        for k in knots:  # a small bump after each merge (optimizer state reset)
            y[k:] += 0.08 * np.exp(-(steps[k:] - k) / 10)
        return y

    ev = np.arange(50, 301, 50)
    return {
        "layers": list(range(L)), "rank": r, "dim": d,
        "singular_values": S,
        "effective_rank": {m: [_effective_rank(s) for s in S[m]] for m in MODULES},
        "phi_layers": {m: np.array([[_phi(a, b) for b in U[m]] for a in U[m]]) for m in MODULES},
        "phi_seeds": np.array([[_phi(U[m][l], U2[m][l]) for l in range(L)] for m in MODULES]),
        "phi_grid": _phi_grid(U8, U32),
        "random_phi": r / d,  # E φ for independent r-dim subspaces of R^d at i = j = r: max(i, j)/d
        "projection": {"delta": 0.3 + 0.1 * rng.random(L) * np.arange(1, L + 1), "own": 20 + 4 * rng.random(L),
                       "random": 0.02 + 0.01 * rng.random(L), "delta_norm": 5 + rng.random(L)},
        "amplification": {m: 8 + 14 * rng.random(L) for m in MODULES},
        "intruders": {m: rng.integers(0, 4, L) for m in MODULES},
        "eps": np.round(np.linspace(0.1, 0.9, 9), 2),
        "condlora": {f: np.clip(np.eye(L) + (1 - np.eye(L)) * (0.03 + 0.012 * np.add.outer(range(L), range(L))
                                                               + 0.005 * rng.random((L, L))), 0, 1)
                     for f in ("C_A", "C_B")},
        "condlora_baselines": {"gaussian": 0.021, "structure": 0.045},
        "runs": {
            "LoRA": {"train_loss": loss(1.0), "eval_steps": ev, "eval_loss": loss(1.0)[ev - 1] + 0.1},
            "CoRA (frozen B)": {"train_loss": loss(0.8), "eval_steps": ev, "eval_loss": loss(0.8)[ev - 1] + 0.1},
            "Chain of LoRA": {"train_loss": loss(0.9, (100, 200)), "eval_steps": ev,
                              "eval_loss": loss(0.9)[ev - 1] + 0.08, "knots": [100, 200]},
        },
    }


def _section(heading: str, text: str, *figures: tuple[Any, str, str], tables=()) -> ReportSection:
    """One report section; ``figures`` as ``(figure, caption, file stem)``."""
    return ReportSection(heading, text, [ReportFigure(*f) for f in figures], tables)


def sample_report(seed: int = 0, data: dict[str, Any] | None = None) -> Report:
    """A full :class:`~lora_lens.report.html.Report` showing every figure type."""
    D = sample_data(seed) if data is None else data
    layers, r = D["layers"], D["rank"]
    base = D["random_phi"]

    fig_s, (a1, a2) = new_figure(1, 2, size=(11, 4))
    plot_singular_values(a1, D["singular_values"]["q_proj"], layers, title="q_proj: singular values of ΔW per layer")
    plot_energy_curves(a2, D["singular_values"]["q_proj"], layers, fraction=0.9, title="q_proj: energy kept at rank j")
    fig_r, ax = new_figure(size=(7, 3.6))
    plot_effective_rank(ax, D["effective_rank"], layers, nominal_rank=r, metric="effective rank exp(H(σ/Σσ))")

    fig_phi = panel_figure({f"{m}: φ between layers (top-{r} left vectors)": D["phi_layers"][m] for m in MODULES},
                           plot_phi_heatmap, ncols=2, panel_size=(5.6, 4.8), layers=layers, baseline=base)
    fig_ab, ax = new_figure(size=(8, 3.2))
    plot_adapter_heatmap(ax, D["phi_seeds"], MODULES, layers, baseline=base, labels=("seed 0", "seed 1"))
    fig_grid, ax = new_figure(size=(9, 3.4))
    i, j = np.arange(1, D["phi_grid"].shape[0] + 1), np.arange(1, D["phi_grid"].shape[1] + 1)
    plot_phi_grid(ax, D["phi_grid"], labels=("A (r=8)", "A (r=32)"), baseline=np.maximum.outer(i, j) / D["dim"],
                  title="φ(A r=8, A r=32, i, j): layer 3, q_proj (as LoRA Figure 3)")

    fig_al, (a1, a2) = new_figure(1, 2, size=(12, 4))
    p = D["projection"]
    plot_projection_norms(a1, p["delta"], p["own"], p["random"], layers, rank=r, delta_norm=p["delta_norm"],
                          title=f"q_proj: W0 projected on three direction sets (r = {r})")
    plot_amplification(a2, D["amplification"], layers)
    fig_in, (a1, a2) = new_figure(1, 2, size=(12, 4))
    plot_intruder_counts(a1, D["intruders"], layers, k=10, eps=0.5)
    sweep = {m: np.array([int(c.sum() * (e / 0.5) ** 1.5) for e in D["eps"]]) for m, c in D["intruders"].items()}
    plot_intruder_sweep(a2, D["eps"], sweep, chosen_eps=0.5, k=10)

    fig_c, axes = new_figure(1, 2, size=(12, 5))
    bl = D["condlora_baselines"]
    for ax, (f, grid) in zip(axes, D["condlora"].items()):
        plot_condlora_grid(ax, grid, layers, gaussian_baseline=bl["gaussian"], structure_baseline=bl["structure"],
                           factor=f, module="query", scale="sqrt")
    fig_t, ax = new_figure(size=(9, 4))
    plot_loss_curves(ax, D["runs"], smooth=0.9)

    er = D["effective_rank"]
    return Report(
        title="lora_lens report — sample (synthetic data)",
        subtitle=f"{len(layers)} layers · modules {', '.join(MODULES)} · r = {r} · synthetic, seed {seed}",
        bullets=[
            f"Mean effective rank {np.mean(er['q_proj']):.2f} (q_proj) and {np.mean(er['v_proj']):.2f} (v_proj) "
            f"of nominal r = {r}.",
            f"Cross-layer φ rises with depth; the random baseline is φ = {base:.3g}.",
            "These numbers are synthetic: the report only shows what each figure looks like.",
        ],
        summary_table=[("adapter", "sample/adapter"), ("base", "sample/base"), ("rank", r), ("layers", len(layers)),
                       ("random φ baseline", base)],
        sections=[
            _section("Spectra",
                     "Singular values of each layer's update ΔW (computed from the factors, never forming ΔW), the "
                     "energy kept at each rank, and the effective rank (Roy & Vetterli) against the nominal rank.",
                     (fig_s, "Singular values and energy curves, q_proj, coloured by depth.", "spectra-q-proj"),
                     (fig_r, "Effective rank per layer; dashed: the nominal rank.", "effective-rank"),
                     tables=[ReportTable(["layer", *MODULES],
                                         [[l, *(er[m][i] for m in MODULES)] for i, l in enumerate(layers)],
                                         "Effective rank per layer")]),
            _section("Similarity across layers",
                     "φ = ‖U_iᵀ U_j‖²_F / r between the top-r left singular vectors of every pair of layers. "
                     "The red line on the colour bar is the random baseline.",
                     (fig_phi, "φ between layers, one panel per module type.", "phi-layers")),
            _section("Adapter vs adapter",
                     "Two seeds of the same adapter compared layer by layer, and the LoRA §7.2 φ(i, j) grid "
                     "between a rank-8 and a rank-32 adapter.",
                     (fig_ab, "φ(seed 0, seed 1) per layer and module type.", "phi-seeds"),
                     (fig_grid, "φ(i, j) for i ≤ 8, j ≤ 32.", "phi-grid")),
            _section("Alignment with W0",
                     "Does ΔW amplify directions W0 already uses? Projection norms (log scale) and the amplification "
                     "factor ‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F (LoRA §7.3).",
                     (fig_al, "Projection norms and amplification per layer.", "alignment")),
            _section("Intruder dimensions",
                     "Top-10 singular vectors of the merged weight whose best cosine with any singular vector of W0 "
                     "is below ε (Shuttleworth et al. 2024).",
                     (fig_in, "Intruder counts per layer (ε = 0.5) and the ε sweep.", "intruders")),
            _section("CondLoRA conversion matrices",
                     "φ between layers of the conversion matrices C_A = W0⁻¹Aᵀ and C_B = W0⁻¹B. Two baselines: "
                     "Gaussian matrices, and W0⁻¹G (structure-aware), which shows how much similarity W0 alone "
                     "explains.",
                     (fig_c, "C_A and C_B, query; colour scale sqrt to spread small φ.", "condlora")),
            _section("Training",
                     "Train loss (smoothed, raw underneath), eval loss (dashed) and Chain-of-LoRA knots (dotted).",
                     (fig_t, "Loss curves of three runs.", "loss")),
        ],
    )
