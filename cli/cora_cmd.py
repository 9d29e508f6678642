"""``lora-lens cora basis|init``: CoRA common-subspace bases and init folders (docs/maths.md §6)."""

from __future__ import annotations

import click

from .common import echo_json, progress_callback, table
from .init_render import render_init
from .options import (compute_options, join_targets, json_option, n_iter_option, out_option, overwrite_option,
                      quiet_option, seed_option, targets_option)


def basis_options(f):
    for opt in reversed([
        click.option("--base", required=True, type=click.Path(path_type=str), help="The base model."),
        click.option("--source", "sources", multiple=True, type=click.Path(path_type=str),
                     help="Another checkpoint of the same architecture (repeatable)."),
        click.option("--rank", required=True, type=int, help="Basis size r."),
        targets_option(),
        click.option("--share-across-layers", is_flag=True, help="One basis per module type, from every layer."),
        click.option("--source-kind", type=click.Choice(["weights", "deltas"]), default="weights", show_default=True,
                     help="Stack the weights [W_base | W_1 …], or the deltas [W_1 − W_base …] (needs --source)."),
        click.option("--scale", type=click.Choice(["orthonormal", "kaiming"]), default="orthonormal",
                     show_default=True, help="Orthonormal B, or B scaled to a Kaiming-uniform B's norm."),
        n_iter_option("Power iterations of the randomized range finder.", default=16),
        seed_option, overwrite_option, json_option, quiet_option, compute_options,
    ]):
        f = opt(f)
    return f


def _basis_kwargs(kw: dict, progress) -> dict:
    return dict(share_across_layers=kw["share_across_layers"], source_kind=kw["source_kind"], scale=kw["scale"],
                n_iter=kw["n_iter"], seed=kw["seed"], compute=kw["compute"], progress=progress)


@click.group("cora")
def cora_cmd() -> None:
    """CoRA: a common subspace of model weights as LoRA's B."""


@cora_cmd.command("basis")
@basis_options
@out_option("Folder for cora_basis.safetensors and cora_basis.json.")
def basis_cmd(base, sources, rank, targets, out, overwrite, as_json, quiet, **kw):
    """Compute the common-subspace bases and write them (no PEFT folder).

    \b
    Examples:
      lora-lens cora basis --base stories260K --rank 16 --targets q_proj,k_proj,v_proj -o basis
      lora-lens cora basis --base stories260K --source ./finetune-a --source ./finetune-b \\
          --source-kind deltas --rank 8 --targets q_proj,v_proj --share-across-layers -o basis-deltas --json
    """
    from lora_lens.methods import cora_basis, write_cora_basis

    with progress_callback("CoRA bases", quiet) as progress:
        basis = cora_basis(base, rank, join_targets(targets), sources, **_basis_kwargs(kw, progress))
    write_cora_basis(basis, out, overwrite=overwrite)
    d = basis.to_dict()
    if as_json:
        echo_json({**d, "out_dir": out})
        return
    click.echo(f"CoRA bases (rank {rank}, {'shared' if d['shared'] else 'per layer'}) written to {out}")
    rows = [[e["key"], "x".join(map(str, e["shape"])), e["singular_values"][0], e["singular_values"][-1], e["energy"]]
            for e in d["bases"]]
    click.echo(table(rows, ["key", "shape", "σ_1", "σ_r", "energy"]))


@cora_cmd.command("init")
@basis_options
@click.option("--mode", type=click.Choice(["frozen", "init"]), default="init", show_default=True,
              help="frozen: B stays the basis, only A trains; init: the basis initializes a trainable B.")
@click.option("--alpha", type=float, default=None, help="lora_alpha (default: the rank, so s = 1).")
@out_option("Init folder to write (a PEFT adapter + lora_lens_init.json).")
def init_cmd(base, sources, rank, targets, mode, alpha, out, overwrite, as_json, quiet, **kw):
    """Write a CoRA init folder: PEFT adapter with lora_B = basis, lora_A = 0.

    \b
    Examples:
      lora-lens cora init --base stories260K --rank 16 --targets q_proj,k_proj,v_proj --mode frozen -o cora
      lora-lens cora init --base all-MiniLM-L6-v2 --rank 8 --targets query,value --mode init -o cora-init
    """
    from lora_lens.methods import cora_init

    with progress_callback("CoRA bases", quiet) as progress:
        result = cora_init(base, rank, join_targets(targets), sources, out_dir=out, mode=mode, alpha=alpha,
                           overwrite=overwrite, **_basis_kwargs(kw, progress))
    render_init(result, as_json, ["key", "module_type", "energy", "sigma_first", "sigma_last"])
