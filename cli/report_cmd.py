"""``lora-lens report ADAPTER [ADAPTER …] [--base DIR] -o DIR``: the HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from .common import echo_json, progress_callback
from .options import (compute_options, epsilon_option, format_option, json_option, out_option, overwrite_option,
                      quiet_option, seed_option, side_option, top_k_option)


@click.command("report")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The base model the adapters were trained on: adds alignment with W0 and intruder dimensions.")
@out_option("Folder to write the report to.")
@click.option("--title", default="lora_lens report", show_default=True)
@click.option("--energy", type=float, default=0.9, show_default=True, help="Energy fraction for the energy rank.")
@top_k_option("Top singular vectors of W0 + ΔW checked for intruders (with --base).", default=10, old="--intruder-k")
@side_option
@epsilon_option(repeatable=False)
@seed_option
@overwrite_option
@json_option
@quiet_option
@compute_options
@format_option
def report_cmd(adapters, base, out, title, energy, top_k, side, epsilon, seed, overwrite, as_json, quiet, compute,
               fmt):
    """Analyze one or more adapters and write a self-contained HTML report
    (index.html, figures/*.png, results.json): spectra and effective ranks,
    φ across layers with random baselines, adapter vs adapter φ, and with
    --base the alignment with W0 and intruder dimensions. A folder written
    by `lora-lens collection` adds its section (clustered φ heatmap, map,
    shared-basis energy). Opens offline.

    \b
    Examples:
      lora-lens report ./my-adapter -o report/
      lora-lens report ./seed0 ./seed1 --base stories260K -o report/ --overwrite
      lora-lens report ./my-collection -o coll-report/
    """
    from lora_lens import analyze_adapters, load_adapters, open_base, stamp
    from lora_lens.io import check_destination
    from lora_lens.report import (COLLECTION_JSON, Report, collection_section, read_collection, write_analysis_report,
                                  write_report)

    collections = [p for p in adapters if (Path(p) / COLLECTION_JSON).is_file()]
    loaded = [a for path in adapters if path not in collections for a in load_adapters(path, fmt)]
    base_weights = open_base(base) if base else None
    check_destination(Path(out), overwrite)  # refuse before the analysis runs, not after
    sections = [collection_section(read_collection(p)) for p in collections]
    if loaded:
        with progress_callback("analysing", quiet) as progress:
            analysis = analyze_adapters(loaded, base_weights, energy=energy, intruder_k=top_k, side=side,
                                        epsilon=epsilon, progress=progress, compute=compute, seed=seed)
        index = write_analysis_report(out, analysis, title=title, energy=energy, overwrite=overwrite,
                                      extra_sections=sections)
    else:
        index = write_report(out, Report(title, f"collections: {', '.join(collections)}", sections=sections),
                             json_data={"collections": collections}, overwrite=overwrite)
    if as_json:
        echo_json(stamp("report_written", {"report": str(index), "folder": out,
                                           "adapters": [a.label for a in loaded], "collections": collections}))
    else:
        click.echo(f"report written: {index}")
