"""``lora-lens extract`` (a LoRA from a full fine-tune) and ``lora-lens intruders`` (intruder reduction)."""

from __future__ import annotations

import contextlib

import click

from .common import echo_json, progress_callback, table
from .options import (compute_options, dask_options, device_option, dtype_option, epsilon_option, format_option,
                      join_targets, json_option, max_memory_option, out_option, overwrite_option, progress_option,
                      quiet_option, seed_option, targets_option, top_k_option)

#: The rank rules besides a fixed --rank (kept here so --help does not import the library).
RULES = ("sv_ratio", "sv_fro", "sv_cumulative", "energy")


@click.command("extract")
@click.option("--base", required=True, type=click.Path(path_type=str), help="The model before fine-tuning.")
@click.option("--tuned", required=True, type=click.Path(path_type=str), help="The fine-tuned model (same architecture).")
@out_option("Folder for the PEFT adapter.")
@click.option("--rank", type=click.IntRange(min=1), help="Keep this many directions per weight.")
@click.option("--method", type=click.Choice(RULES), help="A rank rule instead of --rank (docs/weights.md).")
@click.option("--param", type=float, help="The rule's parameter: sv_ratio ≥ 1; sv_fro, sv_cumulative, energy in (0, 1].")
@click.option("--max-rank", type=click.IntRange(min=1),
              help="Cap of the rules' rank, and how many directions are computed for them (default 64).")
@targets_option(required=False)
@click.option("--embeddings", is_flag=True, help="Also extract Embedding weights (default: copied as modules_to_save "
              "when changed).")
@click.option("--no-modules-to-save", "no_save", is_flag=True,
              help="Leave changed non-target tensors out instead of writing them as modules_to_save.")
@dask_options("per-chunk work")
@seed_option
@overwrite_option
@json_option
@quiet_option
@device_option
@dtype_option
@max_memory_option
def extract_cmd(base, tuned, out, rank, method, param, max_rank, targets, embeddings, no_save, scheduler, workers,
                seed, overwrite, as_json, quiet, device, dtype, max_memory) -> None:
    """Extract a LoRA from a full fine-tune: the top singular pairs of
    W_tuned − W_base for every Linear / Conv1D / Conv2d weight (and with
    --embeddings the embeddings), by the randomized range finder, both
    checkpoints read lazily one chunk at a time. Writes a PEFT folder
    (rank_pattern / alpha_pattern where ranks differ) and reports per
    module the energy kept and the residual ‖ΔW − ΔW_r‖_F.

    \b
    Examples:
      lora-lens extract --base stories260K --tuned ./finetune-a --rank 8 -o extracted
      lora-lens extract --base stories260K --tuned ./finetune-a --rank 4 --targets q_proj,v_proj -o lora --json
      lora-lens extract --base stories260K --tuned ./finetune-b --method sv_fro --param 0.9 --max-rank 16 \\
          -o lora-fro --scheduler tcp://head:8786
    """
    from lora_lens import Compute, WorkerDiedError
    from lora_lens.io import check_destination
    from lora_lens.ops import extract_lora

    if workers and not scheduler:
        scheduler = "local"
    check_destination(out, overwrite)
    compute = Compute(device=device, dtype=dtype, seed=seed,
                      **({} if max_memory is None else {"max_memory": max_memory}))
    with contextlib.ExitStack() as stack:
        mapper = None
        if scheduler:
            from lora_lens import dask_mapper
            mapper = stack.enter_context(dask_mapper(scheduler, workers))
        progress = stack.enter_context(progress_callback("weights", quiet))
        try:
            res = extract_lora(base, tuned, out, rank=rank, method=method, param=param, max_rank=max_rank,
                               targets=join_targets(targets), embeddings=embeddings, modules_to_save=not no_save,
                               mapper=mapper, overwrite=overwrite, compute=compute, progress=progress)
        except WorkerDiedError as e:  # not bad input, not a bug: one line, exit 1
            click.echo(f"error: {e}", err=True)
            click.get_current_context().exit(1)
    if as_json:
        echo_json(res.to_dict())
        return
    rows = [[m.name, f"{m.shape[0]}x{m.shape[1]}", m.rank, m.energy_kept, m.residual / m.norm]
            for m in res.modules if m.rank > 0]
    click.echo(table(rows, ["module", "shape", "rank", "energy kept", "residual/‖ΔW‖"]))
    click.echo(f"written: {out} ({len(rows)} LoRA module(s), {len(res.modules_to_save)} modules_to_save)")
    for n in res.notes:
        click.echo(f"note: {n}")


@click.command("intruders")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--base", required=True, type=click.Path(path_type=str), help="The base model the adapter was trained on.")
@click.option("--reduce", "reduce_", required=True, type=click.FloatRange(0, 1), metavar="λ",
              help="Share of each intruder direction kept, in [0, 1] (PEFT's mitigation_lambda; 0.75 there).")
@out_option("Folder for the reduced PEFT adapter.")
@top_k_option("Top singular vectors of W + ΔW examined per module.", default=10)
@epsilon_option(repeatable=False)
@overwrite_option
@compute_options
@progress_option("intruder reduction")
@json_option
@format_option
def intruders_cmd(adapter, base, reduce_, out, top_k, epsilon, overwrite, compute, as_json, fmt) -> None:
    """Scale down intruder dimensions (PEFT's reduce_intruder_dimension):
    the top-k singular vectors of W + ΔW whose best |cos| with any singular
    vector of W is below ε lose (1 − λ) of their part, and ΔW is refactored
    at the adapter's rank. Writes a PEFT folder of the same ranks.

    \b
    Examples:
      lora-lens intruders ./my-adapter --base stories260K --reduce 0.75 -o reduced
      lora-lens intruders ./my-adapter --base stories260K --reduce 0 --top-k 20 --epsilon 0.4 -o removed --json
    """
    from lora_lens import load_adapter
    from lora_lens.io import check_destination
    from lora_lens.ops import reduce_intruders

    check_destination(out, overwrite)
    res = reduce_intruders(load_adapter(adapter, format=fmt), base, out, reduce=reduce_, top_k=top_k,
                           epsilon=epsilon, overwrite=overwrite, compute=compute)
    if as_json:
        echo_json(res.to_dict())
        return
    rows = [[m.name, len(m.intruders), min(m.max_cos) if m.max_cos else float("nan"), m.removed, m.truncation_error]
            for m in res.modules]
    click.echo(table(rows, ["module", "intruders", "min max|cos|", "‖removed‖", "truncation"]))
    click.echo(f"written: {out} ({res.total} intruder direction(s) scaled by {res.reduce:g})")
    for n in res.notes:
        click.echo(f"note: {n}")
