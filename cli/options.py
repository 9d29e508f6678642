"""Options shared by the commands that compute: ``--device`` and ``--dtype``."""

from __future__ import annotations

import click


def compute_options(f):
    """Add ``--device auto|cpu|cuda[:N]`` and ``--dtype float32|float64`` (passed as ``device``, ``dtype``)."""
    f = click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
                     help="Compute precision (inputs in bf16/fp16 are upcast).")(f)
    f = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                     help="Where the linear algebra runs; auto picks CUDA when present.")(f)
    return f


#: Reader names for ``--format`` (kept here, not imported from the library, so ``--help`` stays light).
ADAPTER_FORMATS = ("peft", "mlx", "kohya", "lycoris", "diffusers", "state_dict")


def format_option(f):
    """Add ``--format NAME`` (passed as ``fmt``): force the adapter reader instead of detecting it."""
    return click.option("--format", "fmt", type=click.Choice(ADAPTER_FORMATS), default=None,
                        help="Adapter format; detected from file and tensor names when omitted (docs/formats.md).")(f)
