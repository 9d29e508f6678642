"""``lora-lens collection ADAPTER… | --list FILE -o DIR``: φ map, clusters and shared basis of many adapters."""

from __future__ import annotations

import contextlib
from pathlib import Path

import click

from .common import echo_json, progress_callback, table
from .options import (dask_options, device_option, dtype_option, json_option, max_memory_option, out_option,
                      overwrite_option, quiet_option, seed_option, side_option, top_k_option)


def read_list(path: str) -> list[str]:
    """One adapter path per line; blank lines and ``#`` comments skipped; relative paths from the file's folder."""
    from lora_lens import ConfigError

    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--list {path}: cannot be read ({e.strerror}); expected a text file with one adapter "
                          "path per line.") from None
    out = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not out:
        raise ConfigError(f"--list {path}: names no adapter; expected one adapter path per line.")
    return [str(q if Path(q).is_absolute() else p.parent / q) for q in out]


@click.command("collection")
@click.argument("adapters", nargs=-1, type=click.Path(path_type=str))
@click.option("--list", "list_file", type=click.Path(path_type=str), help="A file with one adapter path per line.")
@out_option("Folder for collection.json, collection.safetensors and report/.")
@top_k_option("Directions compared per module (default: each pair's smaller rank; capped at it).")
@side_option
@click.option("--weighted", is_flag=True, help="Average modules weighted by ‖ΔW‖ (default: plain mean).")
@click.option("--clusters", default="auto", show_default=True, metavar="K|auto",
              help="Number of clusters, or auto (best silhouette).")
@click.option("--distance-threshold", type=float, help="Cut the tree at this 1 − φ instead of --clusters.")
@click.option("--duplicate", type=float, default=0.99, show_default=True, help="φ at or above which two adapters "
              "are near-duplicates.")
@click.option("--shared-rank", type=click.IntRange(min=1), help="R of the shared basis (default: the largest rank).")
@click.option("--write-basis", type=click.Path(path_type=str), help="Also write the shared basis as a CoRA init "
              "folder here (lora_B = basis, lora_A = 0).")
@click.option("--allow-partial", is_flag=True, help="Compare the modules whose shapes agree instead of stopping.")
@dask_options("per-module work")
@seed_option
@overwrite_option
@json_option
@quiet_option
# the raw --device string travels to the workers, each resolves it (auto: its own GPU), so no compute_options here
@device_option
@dtype_option
@max_memory_option
def collection_cmd(adapters, list_file, out, top_k, side, weighted, clusters, distance_threshold, duplicate,
                   shared_rank, write_basis, allow_partial, scheduler, workers, seed, overwrite, as_json, quiet, device,
                   dtype, max_memory) -> None:
    """Compare many adapters of one base at once: the adapter × adapter φ
    matrix (per module, per module type and overall, with a random
    baseline), clusters, a 2-D map, near-duplicates and outliers, and the
    collection's shared basis (how much of each adapter a rank-R common
    subspace captures). Writes collection.json, collection.safetensors and
    report/ (index.html + figures). Adapters are read one module at a time.

    \b
    Examples:
      lora-lens collection ./adapters/* -o coll/
      lora-lens collection --list adapters.txt -o coll-5/ --clusters 2 --shared-rank 8 --write-basis cora-init/
      lora-lens collection --list adapters.txt -o coll-dask/ --scheduler tcp://head:8786
    """
    from lora_lens import ConfigError
    from lora_lens import WorkerDiedError  # lora_lens.dist's; Dask itself is imported only with --scheduler
    from lora_lens.compare import CollectionSettings, collection_similarity, collection_structure
    from lora_lens.io import check_destination
    from lora_lens.report import write_collection

    paths = list(adapters) + (read_list(list_file) if list_file else [])
    if not paths:
        raise ConfigError("no adapters given; pass ADAPTER paths or --list FILE.")
    if workers and not scheduler:
        scheduler = "local"
    check_destination(Path(out), overwrite)
    if write_basis:
        check_destination(Path(write_basis), overwrite)
    # In this process --device is resolved here; on Dask each worker resolves it (auto: its own GPU).
    settings = CollectionSettings(top_k=top_k, side=side, weighted=weighted, shared_rank=shared_rank,
                                  keep_basis=bool(write_basis), device=None if scheduler else device,
                                  worker_device=device if scheduler else None, dtype=dtype,
                                  **({} if max_memory is None else {"max_memory": max_memory}), seed=seed)
    with contextlib.ExitStack() as stack:
        mapper = None
        if scheduler:
            from lora_lens import dask_mapper
            mapper = stack.enter_context(dask_mapper(scheduler, workers))
        progress = stack.enter_context(progress_callback("modules", quiet))
        try:
            coll = collection_similarity(paths, settings, allow_partial=allow_partial, mapper=mapper,
                                         progress=progress)
        except WorkerDiedError as e:  # not bad input (exit 2), not a bug ("internal error"): one line, exit 1
            click.echo(f"error: {e}", err=True)
            click.get_current_context().exit(1)
    structure = collection_structure(coll, clusters, distance_threshold, duplicate, seed)
    write_collection(out, coll, structure, overwrite=overwrite)
    if write_basis:
        from lora_lens.methods import collection_cora_init
        collection_cora_init(coll, write_basis, overwrite=overwrite)
    if as_json:
        import json
        echo_json(json.loads((Path(out) / "collection.json").read_text()))
        return
    click.echo(render(coll, structure, out))


def render(coll, st, out: str) -> str:
    names = coll.labels
    at, _ = coll.shared_energy("both")
    lines = [f"{coll.size} adapters, {len(coll.modules)} modules; clusters: {st.n_clusters} ({st.method})",
             f"written to {out}/ (collection.json, report/index.html)"]
    rows = [[n, st.labels[i], float(coll.norms[i]), float(coll.effective_rank[i]), float(at[i]),
             names[st.nearest[i]], st.nearest_phi[i]] for i, n in enumerate(names)]
    lines.append(table(rows, ["adapter", "cluster", "‖ΔW‖", "eff.rank", "energy@R", "nearest", "φ"]))
    for i, j, p in st.duplicates:
        lines.append(f"near-duplicate: {names[i]} ~ {names[j]} (φ {p:.3f})")
    for i, reasons in st.outliers.items():
        lines.append(f"outlier: {names[i]}: {'; '.join(reasons)}")
    for key, missing in coll.partial.items():
        lines.append(f"partial: {key} missing in {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    for key, why in coll.skipped.items():
        lines.append(f"skipped: {key}: {why}")
    lines += [f"note: {n}" for n in coll.notes]
    return "\n".join(lines) + "\n"
