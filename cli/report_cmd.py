"""``lora-lens report ADAPTER [ADAPTER …] [--base DIR] -o DIR``: the HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from .common import echo_json, progress_callback
from .options import (compute_options, epsilon_option, format_option, json_option, out_option, overwrite_option,
                      quiet_option, seed_option)


@click.command("report")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--base", type=click.Path(path_type=str), default=None,
              help="The base model the adapters were trained on: adds alignment with W0 and intruder dimensions.")
@out_option("Folder to write the report to.")
@click.option("--title", default="lora_lens report", show_default=True)
@click.option("--energy", type=float, default=0.9, show_default=True, help="Energy fraction for the energy rank.")
@click.option("--intruder-k", type=int, default=10, show_default=True, help="Top-k merged singular vectors checked.")
@epsilon_option(repeatable=False)
@seed_option
@overwrite_option
@json_option
@quiet_option
@compute_options
@format_option
def report_cmd(adapters, base, out, title, energy, intruder_k, epsilon, seed, overwrite, as_json, quiet, compute,
               fmt):
    """Analyze one or more adapters and write a self-contained HTML report
    (index.html, figures/*.png, results.json): spectra and effective ranks,
    φ across layers with random baselines, adapter vs adapter φ, and with
    --base the alignment with W0 and intruder dimensions. Opens offline.

    \b
    Examples:
      lora-lens report ./adapter -o report/
      lora-lens report ./seed0 ./seed1 --base ./Llama-2-7b-hf -o report/ --overwrite
    """
    from lora_lens import load_adapters, open_base
    from lora_lens.io import check_destination
    from lora_lens.report.analysis import analyze_adapters, write_analysis_report

    loaded = [a for path in adapters for a in load_adapters(path, fmt)]
    base_weights = open_base(base) if base else None
    check_destination(Path(out), overwrite)  # refuse before the analysis runs, not after
    with progress_callback("analysing", quiet) as progress:
        analysis = analyze_adapters(loaded, base_weights, energy=energy, intruder_k=intruder_k, epsilon=epsilon,
                                    progress=progress, compute=compute, seed=seed)
    index = write_analysis_report(out, analysis, title=title, energy=energy, overwrite=overwrite)
    if as_json:
        echo_json({"report": str(index), "folder": out, "adapters": [a.label for a in loaded]})
    else:
        click.echo(f"report written: {index}")
