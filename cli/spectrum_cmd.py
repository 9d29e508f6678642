"""``lora-lens spectrum ADAPTER``: singular values of every ΔW = s·B·A and what they say."""

from __future__ import annotations

import click

from .common import echo_json, progress_callback, table
from .options import compute_options, format_option, json_option, quiet_option


@click.command("spectrum")
@click.argument("adapter", type=click.Path(path_type=str))
@json_option
@click.option("--layers", "per_layer", is_flag=True, help="Also print one row per module.")
@compute_options
@click.option("--energy", type=float, default=0.9, show_default=True,
              help="Energy fraction for rank_at_energy (PEFT's convention: Σσ² kept).")
@click.option("--fro", type=float, default=0.9, show_default=True,
              help="Frobenius fraction for rank_at_fro (kohya's sv_fro: ‖σ‖ kept).")
@click.option("--adapter", "adapter_name", default=None, help="Which named adapter, when the folder holds several.")
@quiet_option
@format_option
def spectrum_cmd(adapter: str, as_json: bool, per_layer: bool, compute, energy: float, fro: float,
                 adapter_name: str | None, quiet: bool, fmt: str | None) -> None:
    """Singular values of every LoRA update ΔW = s·B·A (never formed) and its
    effective rank, stable rank, energy and the rank that keeps a given
    fraction of it, summarized per module type across layers.

    \b
    Examples:
      lora-lens spectrum ./my-adapter
      lora-lens spectrum ./my-adapter --layers --energy 0.95
      lora-lens spectrum ./my-adapter --json --dtype float64 > spectra.json
      lora-lens spectrum ./runs --adapter seed1 --device auto --max-memory 2GB
    """
    from lora_lens import adapter_spectra, load_adapter

    loaded = load_adapter(adapter, adapter_name, format=fmt)
    with progress_callback("decomposing LoRA modules", quiet) as progress:
        result = adapter_spectra(loaded, energy=energy, fro=fro, compute=compute,
                                 progress=progress)
    if as_json:
        echo_json(result.to_dict())
        return
    click.echo(render(result, per_layer))


def _span(stat: dict, fmt: str = "{:.3g}") -> str:
    lo, hi, mean = (fmt.format(stat[k]) for k in ("min", "max", "mean"))
    return mean if lo == hi else f"{mean} ({lo}–{hi})"


def render(result, per_layer: bool = False) -> str:
    e, f = f"{result.energy_fraction:.0%}", f"{result.fro_fraction:.0%}"
    lines = [
        f"Spectra of ΔW = s·B·A: {result.label} ({len(result.layers)} modules, {result.dtype} on {result.device})",
        f"  eff. rank: Roy & Vetterli; r@{e} energy: PEFT's cut-off; r@{f} fro: kohya's sv_fro; "
        "mean (min–max) over layers",
    ]
    lines += [f"  note: {flag}" for flag in result.flags]
    zero = [r.name for r in result.layers if r.fro_norm == 0]
    if zero:
        lines.append(f"  note: {len(zero)} module(s) have a zero update (B = 0, untrained?); their ranks read 0.")
    rows = []
    for t, s in result.summary.items():
        st = s.stats
        rows.append([t, s.layers, ", ".join(f"{m}x{n}" for m, n in s.shapes), ",".join(map(str, s.ranks)),
                     _span(st["fro_norm"]), _span(st["top_singular_value"]), _span(st["effective_rank"]),
                     _span(st["stable_rank"]), _span(st["rank_at_energy"], "{:.3g}"), _span(st["rank_at_fro"], "{:.3g}")])
    out = "\n".join(lines) + "\n\n" + table(
        rows, ["module type", "layers", "m x n", "r", "‖ΔW‖_F", "σ1", "eff. rank", "stable rank", f"r@{e} energy",
               f"r@{f} fro"])
    if per_layer:
        rows = [[r.name, r.rank, r.fro_norm, r.top_singular_value, float(r.singular_values[-1]), r.effective_rank,
                 r.stable_rank, r.rank_at_energy, r.rank_at_fro] for r in result.layers]
        out += "\n\n" + table(rows, ["module", "r", "‖ΔW‖_F", "σ1", "σk", "eff. rank", "stable rank",
                                     f"r@{e} energy", f"r@{f} fro"])
    return out + "\n"
