"""Options shared by the commands that compute: ``--device``, ``--dtype`` and ``--max-memory``, as one ``Compute``."""

from __future__ import annotations

import functools

import click

from .common import ByteSize


def compute_options(f):
    """Add ``--device``, ``--dtype`` and ``--max-memory``; the command receives them as one ``compute``.

    The :class:`lora_lens.compute.Compute` is built here, once per run (device
    and dtype resolved), and the command passes it to the library unchanged
    (``seed=``/``progress=`` keywords beside it fill in the rest).
    """

    @functools.wraps(f)
    def command(*args, device: str, dtype: str, max_memory: int | None, **kwargs):
        from lora_lens.compute import Compute  # imported when the command runs, not for --help

        compute = Compute(device=device, dtype=dtype) if max_memory is None else \
            Compute(device=device, dtype=dtype, max_memory=max_memory)
        return f(*args, compute=compute, **kwargs)

    command = click.option("--max-memory", type=ByteSize(), default=None, metavar="SIZE",
                           help="Device memory budget of one chunk, e.g. 2GB, 512MiB (default 4 GiB).")(command)
    command = click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                           show_default=True, help="Compute precision (inputs in bf16/fp16 are upcast).")(command)
    command = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                           help="Where the linear algebra runs; auto picks CUDA when present.")(command)
    return command
