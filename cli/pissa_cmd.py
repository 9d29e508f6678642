"""``lora-lens pissa``: PiSSA init (``lora-lens reduce`` moved to :mod:`.resize_cmd`)."""

from __future__ import annotations

import click

from .init_render import render_init
from .options import (compute_options, join_targets, json_option, n_iter_option, out_option, overwrite_option,
                      progress_option, renamed_option, seed_option, targets_option)


@click.command("pissa")
@click.option("--base", required=True, type=click.Path(path_type=str), help="The base model.")
@click.option("--rank", required=True, type=int, help="LoRA rank r.")
@targets_option()
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank, so s = 1).")
@n_iter_option("Randomized SVD with this many power iterations (PEFT's pissa_niter_N); default: exact SVD.")
@renamed_option("--niter", "--n-iter", "n_iter", type=click.IntRange(min=0))
@out_option("Init folder: a PEFT adapter, residual_model.safetensors and lora_lens_init.json.")
@overwrite_option
@seed_option
@compute_options
@progress_option("SVD of the base weights")
@json_option
def pissa_cmd(base, rank, targets, alpha, n_iter, out, overwrite, seed, compute, as_json):
    """PiSSA init: B, A from W0's top-r singular triplets, residual base W0 − s·B·A.

    Load the residual weights into the base model, then the adapter with PEFT.

    \b
    Examples:
      lora-lens pissa --base stories260K --rank 16 --targets q_proj,v_proj -o pissa
      lora-lens pissa --base stories260K --rank 4 --targets q_proj --n-iter 4 -o pissa-r4 --json
    """
    from lora_lens.methods import pissa_init

    result = pissa_init(base, rank, join_targets(targets), out_dir=out, alpha=alpha, niter=n_iter,
                        overwrite=overwrite, compute=compute, seed=seed)
    render_init(result, as_json, ["module", "shape", "sigma_first", "sigma_last", "energy"])
