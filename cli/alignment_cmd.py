"""``lora-lens alignment ADAPTER --base DIR``: how ΔW relates to W0 (LoRA §7.3) and intruder dimensions."""

from __future__ import annotations

import click

from .common import echo_json, progress_callback, table
from .options import (compute_options, epsilon_option, format_option, json_option, quiet_option,
                      seed_option, top_k_option)


@click.command("alignment")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str),
              help="The base checkpoint the adapter was trained on.")
@top_k_option("Top singular vectors of W0 + ΔW checked for intruders.", default=10, old="--intruder-k")
@epsilon_option(repeatable=True)
@seed_option
@json_option
@quiet_option
@compute_options
@format_option
def alignment_cmd(adapter, base, top_k, epsilon, seed, as_json, quiet, compute, fmt) -> None:
    """Projection of W0 on ΔW's directions, amplification, and intruder dimensions.

    Per module: ‖ΔW‖_F, ‖W0‖_F, ‖U_rᵀ W0 V_r‖_F for ΔW's top-r singular vectors,
    for W0's own top-r and for random ones, and the amplification factor
    ‖ΔW‖_F / ‖U_rᵀ W0 V_r‖_F (LoRA paper §7.3). Then the top-k singular vectors
    of W0 + ΔW whose best |cos| with any singular vector of W0 is below ε
    (Shuttleworth et al. 2024). Needs full SVDs of W0-sized matrices.

    \b
    Examples:
      lora-lens alignment ./my-adapter --base stories260K
      lora-lens alignment ./my-adapter --base stories260K --epsilon 0.3 --epsilon 0.5 --epsilon 0.7 --json
    """
    from lora_lens import load_adapter, open_base
    from lora_lens.compare import analyze_alignment

    with progress_callback("alignment with W0", quiet) as progress:
        res = analyze_alignment(load_adapter(adapter, format=fmt), open_base(base), intruder_k=top_k,
                                epsilon=list(epsilon) or 0.5, compute=compute, seed=seed,
                                progress=progress)
    if as_json:
        echo_json(res.to_dict())
        return
    al, it = res.alignment, res.intruders
    eps = it.epsilons
    counts = {m.name: m.counts for m in it.modules}
    rows = [[m.name, m.rank, m.delta_norm, m.w0_norm, m.proj_delta, m.proj_w0, m.proj_random, m.amplification,
             *counts[m.name]] for m in al.modules]
    header = ["module", "r", "‖ΔW‖", "‖W0‖", "proj ΔW", "proj W0", "proj rand", "amplif.",
              *[f"intr. ε={e:g}" for e in eps]]
    click.echo(f"Adapter {al.adapter} against base {al.base}\n"
               f"proj X = ‖U_rᵀ W0 V_r‖_F with U_r, V_r the top-r singular vectors of ΔW, of W0, or random "
               f"(mean of {al.draws} draws); amplif. = ‖ΔW‖_F / proj ΔW")
    for n in al.notes:
        click.echo(f"note: {n}")
    click.echo("\n" + table(rows, header))
    totals = ", ".join(f"{t} at ε={e:g}" for t, e in zip(it.totals, eps))
    click.echo(f"\nIntruder dimensions among the top-{it.k} singular vectors of W0 + ΔW: {totals} "
               f"(over {len(it.modules)} modules, {sum(len(m.max_cos) for m in it.modules)} vectors; k is capped at "
               "min(m, n) per module)")
