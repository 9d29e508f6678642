"""``lora-lens condlora analyze|init``: conversion-matrix analysis and Θ init files (docs/maths.md §5)."""

from __future__ import annotations

import click

from .common import echo_json, table
from .init_render import render_init
from .options import (compute_options, join_targets, json_option, out_option, overwrite_option, progress_option,
                      seed_option, targets_option)


@click.group("condlora")
def condlora_cmd() -> None:
    """CondLoRA: how layers' LoRA factors relate through W0, and Θ init files."""


@condlora_cmd.command("analyze")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str), help="The base model the adapter was trained on.")
@click.option("--mode", type=click.Choice(["auto", "official", "general"]), default="auto", show_default=True,
              help="Equations: official W0 C_A = Aᵀ (square W0), general W0ᵀ C_A = Aᵀ; auto picks per module type.")
@click.option("--rcond", type=float, default=None, help="Relative cut-off for small singular values (least squares).")
@seed_option
@compute_options
@progress_option("conversion matrices")
@json_option
def analyze_cmd(adapter, base, mode, rcond, seed, compute, as_json) -> None:
    """Conversion matrices of every layer and their cross-layer similarity.

    For each module type and factor, solves W0 · C = factor per layer and
    compares layers by φ of the left singular vectors of C (i = j = r), beside
    a Gaussian baseline and the structure-aware baseline φ(W0⁻¹ G). --json
    prints the L×L grids.

    \b
    Examples:
      lora-lens condlora analyze ./my-adapter --base stories260K
      lora-lens condlora analyze ./my-adapter --base stories260K --mode general --json > grids.json
    """
    from lora_lens.methods import condlora_analysis

    result = condlora_analysis(adapter, base, rcond=rcond, mode=mode, compute=compute, seed=seed)
    if as_json:
        echo_json(result.to_dict())
        return
    rows = []
    for g in result.grids:
        s = g.summary()
        rows.append([g.module_type, g.side, g.equation, len(g.blocks), s["phi_offdiag"], s["phi_offdiag_deep"],
                     s["gaussian_offdiag"], s["structural_offdiag"], s["random_expectation"], s["residual_max"]])
    click.echo(f"CondLoRA conversion matrices of {result.label} (base {result.base}); mean off-diagonal φ:")
    click.echo(table(rows, ["module type", "side", "equation", "L", "φ", "φ deep half", "gaussian", "W0⁻¹G",
                            "r/d", "residual max"]))
    if result.skipped:
        click.echo(f"skipped (not Linear/Conv1D): {', '.join(result.skipped)}")


@condlora_cmd.command("init")
@click.option("--base", required=True, type=click.Path(path_type=str), help="The base model to train on.")
@click.option("--rank", type=int, default=None, help="LoRA rank r (default with --from: the adapter's).")
@targets_option(required=False)
@click.option("--from", "from_adapter", type=click.Path(path_type=str), default=None,
              help="Warm start: fit Θ to this trained adapter's factors (least squares across layers).")
@click.option("--mode", type=click.Choice(["auto", "official", "general"]), default="auto", show_default=True,
              help="official: A = Θ_A W0ᵀ, B = W0 Θ_Bᵀ (square W0 only); general: A = Θ_Aᵀ W0, B = W0 Θ_B; "
                   "auto: per module type, official where W0 is square, else general.")
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank, so s = 1).")
@out_option("Init folder to write (lora_lens_init.json, condlora_theta.safetensors, peft/).")
@overwrite_option
@seed_option
@compute_options
@progress_option("CondLoRA Θ")
@json_option
def init_cmd(base, rank, targets, from_adapter, mode, alpha, out, overwrite, seed, compute, as_json):
    """Write CondLoRA Θ (one pair per module type) and the PEFT adapter it gives.

    \b
    Examples:
      lora-lens condlora init --base all-MiniLM-L6-v2 --rank 8 --targets query,value -o condlora-init
      lora-lens condlora init --base stories260K --targets q_proj,k_proj --mode general --rank 8 -o cl
      lora-lens condlora init --base stories260K --from ./my-adapter -o warm
    """
    from lora_lens.methods import condlora_init

    result = condlora_init(base, rank, join_targets(targets), out_dir=out, alpha=alpha, mode=mode,
                           from_adapter=from_adapter, overwrite=overwrite, compute=compute, seed=seed)
    render_init(result, as_json, ["module_type", "layers", "shape", "theta_A", "theta_B", "parameters",
                                  "lora_parameters", "init", "fit"])
