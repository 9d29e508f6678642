"""``lora-lens merge A B … -o OUT``: Σ wᵢ ΔWᵢ per module, exactly (cat) or at a rank (svd, PEFT's pruning merges)."""

from __future__ import annotations

import click

from .options import (compute_options, format_option, json_option, out_option, overwrite_option, progress_option,
                      seed_option)
from .resize_cmd import render_written, to_option

#: Kept here, not imported from the library, so ``--help`` stays light (lora_lens.ops.merge.MERGE_METHODS).
METHODS = ("cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(w) for w in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers separated by commas, e.g. 0.7,0.3") from None


@click.command("merge")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--weights", callback=_weights, default=None,
              help="One weight per adapter, comma-separated (default: 1 each, the plain sum).")
@click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="cat: exact, ranks add; svd: best rank-R approximation of Σ wᵢΔWᵢ; the others: PEFT's *_svd "
                   "merges on the dense ΔWᵢ, cut to rank R.")
@click.option("--rank", type=int, default=None, help="Rank R of the result (default: the largest input rank).")
@click.option("--density", type=float, default=None,
              help="Fraction of entries each ΔWᵢ keeps (ties, dare_linear, dare_ties, magnitude_prune).")
@click.option("--majority-sign-method", type=click.Choice(["total", "frequency"]), default="total",
              show_default=True, help="TIES' sign election (ties, dare_ties), as PEFT.")
@seed_option
@to_option
@out_option("Where to write the merged adapter (a folder for PEFT).")
@overwrite_option
@format_option
@compute_options
@progress_option("merging modules")
@json_option
def merge_cmd(adapters, weights, method, rank, density, majority_sign_method, seed, to, out, overwrite, fmt, compute,
              as_json):
    """Merge adapters of the same base: Σ wᵢ ΔWᵢ per module. cat and svd
    work on the factors (exact, and the factored SVD of the cat adapter);
    ties / dare_* / magnitude_prune follow PEFT's add_weighted_adapter *_svd
    modes. Modules missing from some adapters merge from those that have
    them.

    \b
    Examples:
      lora-lens merge ./seed0 ./seed1 --weights 0.7,0.3 --method svd --rank 8 -o merged
      lora-lens merge ./adapters/a ./adapters/b ./adapters/c --method ties --density 0.5 --rank 16 -o ties --json
    """
    from lora_lens.ops import merge

    result = merge(list(adapters), out, weights=weights, method=method, rank=rank, density=density, seed=seed,
                   majority_sign_method=majority_sign_method, to=to, overwrite=overwrite, format=fmt, compute=compute)
    render_written(result, as_json, ["module", "adapters", "rank_after", "energy_kept", "fro_error_rel"])
