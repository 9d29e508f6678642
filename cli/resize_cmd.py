"""``lora-lens resize`` (keep each module's top singular directions) and its old name ``lora-lens reduce``."""

from __future__ import annotations

import click

from .common import echo_json, table
from .options import compute_options, format_option, json_option, out_option, overwrite_option, progress_option

#: Kept here, not imported from the library, so ``--help`` stays light (lora_lens.ops.rank_rules / ops.output).
RULES = ("sv_ratio", "sv_fro", "sv_cumulative", "energy")
TARGETS = ("peft", "kohya", "mlx", "diffusers")


def to_option(f):
    """``--to FORMAT`` (passed as ``to``): the output format, the (first) input's by default."""
    return click.option("--to", "to", type=click.Choice(TARGETS), default=None,
                        help="Output format (default: the input's; LyCORIS → kohya, research state dicts → peft).")(f)


def render_written(result, as_json: bool, columns: list[str]) -> None:
    """Print what resize / merge wrote: one JSON object, or the folders, a summary line and a table; notes on stderr."""
    for note in result.notes:
        click.echo(f"note: {' '.join(str(note).split())}", err=True)
    if as_json:
        echo_json(result.to_dict())
        return
    d = result.to_dict()
    click.echo("\n".join(f"written ({d['to']}): {p}" for p in d["written"]))
    click.echo("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in d["summary"].items() if v is not None))
    click.echo(table([[rec.get(c) for c in columns] for rec in d["records"]], columns))


def _output_options(f):
    """Where and how resize (and its old name, reduce) write, and how they compute."""
    for option in reversed((to_option, out_option("Where to write the resized adapter (a folder for PEFT)."),
                            overwrite_option, format_option, compute_options,
                            progress_option("decomposing LoRA modules"), json_option)):
        f = option(f)
    return f


def _resize_options(f):
    f = click.option("--max-rank", type=int, default=None, help="Keep at most this many directions per module.")(f)
    f = click.option("--param", type=float, default=None,
                     help="The rule's parameter: sv_ratio P ≥ 1 (σᵢ > σ₁/P); sv_fro, sv_cumulative, energy in (0, 1].")(f)
    f = click.option("--method", type=click.Choice(RULES), default=None,
                     help="Rank rule per module (sd-scripts' sv_ratio / sv_fro / sv_cumulative, PEFT's energy).")(f)
    f = click.option("--rank", type=int, default=None, help="Keep this many directions per module.")(f)
    return f


@click.command("resize")
@click.argument("adapter", type=click.Path(path_type=str))
@_resize_options
@_output_options
def resize_cmd(adapter, rank, method, param, max_rank, to, out, overwrite, fmt, compute, as_json):
    """Resize an adapter: keep each module's top singular directions (best
    rank-k approximation, scale kept), computed from the factors without
    forming ΔW. Any format read; LoKr/LoHa come out as plain LoRA.

    \b
    Examples:
      lora-lens resize ./my-r64-adapter --rank 16 -o my-r16-adapter
      lora-lens resize style_lora.safetensors --method sv_fro --param 0.9 --max-rank 32 --to peft -o small --json
    """
    from lora_lens.ops import resize

    result = resize(adapter, out, rank=rank, method=method, param=param, max_rank=max_rank, to=to,
                    overwrite=overwrite, format=fmt, compute=compute)
    render_written(result, as_json, ["module", "rank_before", "rank_after", "energy_kept", "fro_error_rel"])


@click.command("reduce")
@click.argument("adapter", type=click.Path(path_type=str))
@_resize_options
@click.option("--energy", type=float, default=None, help="Same as --method energy --param F (kept for old scripts).")
@_output_options
def reduce_cmd(adapter, rank, method, param, max_rank, energy, to, out, overwrite, fmt, compute, as_json):
    """Old name of `lora-lens resize` (same options, plus --energy F for
    --method energy --param F); its --json result keeps the kind
    reduced_adapter.

    \b
    Examples:
      lora-lens reduce ./my-r64-adapter --rank 16 -o my-r16-adapter
      lora-lens reduce ./my-adapter --energy 0.9 -o smaller --json
    """
    from lora_lens.methods import reduce_rank

    result = reduce_rank(adapter, rank=rank, energy=energy, method=method, param=param, max_rank=max_rank, to=to,
                         out_dir=out, overwrite=overwrite, format=fmt, compute=compute)
    render_written(result, as_json, ["module", "rank_before", "rank_after", "energy_kept", "fro_error_rel"])
