"""Entry point of the ``lora-lens`` console script."""

from __future__ import annotations

import os

import click

from lora_lens import __version__

from .alignment_cmd import alignment_cmd
from .common import LoraLensGroup
from .inspect_cmd import inspect_cmd
from .similarity_cmd import similarity_cmd
from .spectrum_cmd import spectrum_cmd
from .train_cmd import train_cmd
from .compare_methods_cmd import compare_methods_cmd
from .condlora_cmd import condlora_cmd
from .cora_cmd import cora_cmd
from .demo_cmd import demo_cmd
from .pissa_cmd import pissa_cmd, reduce_cmd
from .report_cmd import report_cmd


@click.group(cls=LoraLensGroup, context_settings={"help_option_names": ["-h", "--help"]})
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


main.add_command(inspect_cmd)
main.add_command(spectrum_cmd)
main.add_command(similarity_cmd)
main.add_command(alignment_cmd)
main.add_command(train_cmd)
main.add_command(condlora_cmd)
main.add_command(cora_cmd)
main.add_command(pissa_cmd)
main.add_command(reduce_cmd)
main.add_command(report_cmd)
main.add_command(demo_cmd)
main.add_command(compare_methods_cmd)

if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename("lora-lens"))
