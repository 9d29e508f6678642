"""Entry point of the ``lora-lens`` console script (installed as ``lora_lens_cli.main:main``).

Sub-commands are loaded lazily: each is imported when it runs or its help is
shown, and command modules import the library inside their functions, so
``lora-lens --help`` imports neither torch nor matplotlib.
"""

from __future__ import annotations

import click

from lora_lens import __version__

from .common import LoraLensGroup

# command name → "module:attribute", relative to this package
COMMANDS = {
    "alignment": ".alignment_cmd:alignment_cmd",
    "collection": ".collection_cmd:collection_cmd",
    "condlora": ".condlora_cmd:condlora_cmd",
    "convert": ".convert_cmd:convert_cmd",
    "compare-methods": ".compare_methods_cmd:compare_methods_cmd",
    "cora": ".cora_cmd:cora_cmd",
    "demo": ".demo_cmd:demo_cmd",
    "extract": ".extract_cmd:extract_cmd",
    "inspect": ".inspect_cmd:inspect_cmd",
    "intruders": ".extract_cmd:intruders_cmd",
    "pissa": ".pissa_cmd:pissa_cmd",
    "merge": ".merge_cmd:merge_cmd",
    "reduce": ".resize_cmd:reduce_cmd",
    "report": ".report_cmd:report_cmd",
    "resize": ".resize_cmd:resize_cmd",
    "similarity": ".similarity_cmd:similarity_cmd",
    "spectrum": ".spectrum_cmd:spectrum_cmd",
    "train": ".train_cmd:train_cmd",
}


@click.group(cls=LoraLensGroup, lazy_subcommands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lora-lens")
@click.option("--debug", is_flag=True, envvar="LORA_LENS_DEBUG", help="Print tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Look inside LoRA adapters: spectra, subspace similarity, alignment with
    the base, CoRA/CondLoRA inits, a small trainer and reports.

    Exit codes: 0 success, 1 internal failure, 2 bad input.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="lora-lens")
