"""Options shared by the commands, one spelling and one help text each.

``-o/--out`` wherever something is written, ``--json``, ``--seed``,
``--overwrite``, ``--quiet``, ``--epsilon``, ``--n-iter``, ``--top-k`` (how
many top singular directions), ``--side`` (which singular vectors φ compares), ``--targets`` and
``--device/--dtype/--max-memory`` (one ``Compute``). Old spellings stay as
hidden aliases (:func:`renamed_option`) that print a deprecation note.
Importing this module imports click only: the help of every command is built
without torch.
"""

from __future__ import annotations

import functools

import click

from .common import ByteSize, progress_callback

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON object on stdout instead of text (schemas: docs/formats.md).")
seed_option = click.option("--seed", default=0, show_default=True, type=int,
                           help="Seed of every random draw (baselines, projections, inits, merge's DARE masks).")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bar or progress messages on stderr.")


def out_option(what: str, *, default: str | None = None):
    """``-o/--out OUT`` (passed as ``out``): required unless a default is given."""
    if default is None:  # click 8.5 treats an explicit default=None as a default and stops requiring the option
        return click.option("-o", "--out", "out", required=True, type=click.Path(path_type=str), help=what)
    return click.option("-o", "--out", "out", default=default, show_default=True, type=click.Path(path_type=str),
                        help=what)


def top_k_option(help: str, default: int | None = None, *, old: str | None = None):
    """``--top-k K``: how many top singular directions (passed as ``top_k``), the one spelling on every command.

    ``old``: the command's former spelling (``--k``, ``--intruder-k``), still accepted through
    :func:`renamed_option`.
    """
    option = click.option("--top-k", "top_k", type=click.IntRange(min=1), default=default,
                          show_default=default is not None, help=help)
    if old is None:
        return option
    alias = renamed_option(old, "--top-k", "top_k", type=click.IntRange(min=1))
    return lambda f: option(alias(f))


class _SideChoice(click.Choice):
    """out | in | both; the old ``left``/``right`` are still accepted, with a note."""

    OLD = {"left": "out", "right": "in"}

    def convert(self, value, param, ctx):
        if value in self.OLD:
            click.echo(f"note: --side {value} is now spelled --side {self.OLD[value]}.", err=True)
            value = self.OLD[value]
        return super().convert(value, param, ctx)


#: ``--side out|in|both`` (passed as ``side``): the same option and default (None → out for ΔW) on
#: ``similarity``, ``collection`` and ``report``.
side_option = click.option(
    "--side", type=_SideChoice(["out", "in", "both"]), default=None,
    help="Singular vectors φ compares: out = ΔW's output space, U (the default: after short training the input "
         "side mostly reflects A's random init, so same-seed adapters look alike there); in = input space, V; "
         "both = the mean of the two. (similarity --what A / B: in / out, their only side.)")


def n_iter_option(help: str, default: int | None = None):
    """``--n-iter N``: power iterations of a randomized SVD (passed as ``n_iter``)."""
    return click.option("--n-iter", "n_iter", type=click.IntRange(min=0), default=default,
                        show_default=default is not None, help=help)


def epsilon_option(*, repeatable: bool):
    """``--epsilon ε``: the intruder threshold on the best |cos| with W0's singular vectors, in (0, 1).

    Repeatable (a tuple, empty when not given) where the command prints one
    count per ε; single-valued otherwise. Default 0.5 in both.
    """
    eps = click.FloatRange(0, 1, min_open=True)
    help_ = "Intruder threshold ε on the best |cos| with any singular vector of W0 (default 0.5)"
    if repeatable:
        return click.option("--epsilon", type=eps, multiple=True, help=help_ + "; repeat for a sweep.")
    return click.option("--epsilon", type=eps, default=0.5, help=help_ + ".")


def targets_option(required: bool = True):
    return click.option(
        "--targets", "targets", multiple=True, required=required,
        help="Module names, comma-separated or repeated: q_proj,v_proj selects every module type ending with "
             "them (self_attn.q_proj, …).",
    )


def join_targets(targets: tuple[str, ...]) -> list[str] | None:
    """``--targets`` values, comma-separated or repeated, as one list (None when none were given)."""
    names = [t.strip() for group in targets for t in group.split(",") if t.strip()]
    return names or None


device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                             help="Where the computation runs; auto picks CUDA when present.")
dtype_option = click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
                            show_default=True, help="Compute precision (inputs in bf16/fp16 are upcast).")


max_memory_option = click.option("--max-memory", type=ByteSize(), default=None, metavar="SIZE",
                                 help="Device memory budget of one chunk, e.g. 2GB, 512MiB (default 4 GiB; under 1 MiB, one module a chunk, with a warning).")


#: ``--save-dtype``: the dtype of written weights, apart from ``--dtype`` (the compute precision); every command
#: that writes an adapter in its input's dtype takes it (passed as ``save_dtype``, a torch dtype name or None).
save_dtype_option = click.option("--save-dtype", "save_dtype", type=click.Choice(["float32", "float16", "bfloat16",
                                 "float64"]), default=None,
                                 help="Dtype of the written weights [default: the input's].")


def compute_options(f):
    """Add ``--device``, ``--dtype`` and ``--max-memory``; the command receives them as one ``compute``.

    The :class:`lora_lens.compute.Compute` is built here, once per run (device
    and dtype resolved), and the command passes it to the library unchanged
    (``seed=``/``progress=`` keywords beside it fill in the rest).
    """

    @functools.wraps(f)  # copies __click_params__: the options declared below carry over
    def command(*args, device: str, dtype: str, max_memory: int | None, **kwargs):
        from lora_lens import Compute  # imported when the command runs, not for --help

        compute = Compute(device=device, dtype=dtype) if max_memory is None else \
            Compute(device=device, dtype=dtype, max_memory=max_memory)
        return f(*args, compute=compute, **kwargs)

    return device_option(dtype_option(max_memory_option(command)))


def progress_option(label: str):
    """Add ``-q/--quiet``; the command's ``compute`` reports to a progress bar on stderr labelled ``label``.

    Place it right below :func:`compute_options`: it receives the ``Compute``
    and hands the command one whose ``progress`` draws the bar (never with
    ``--quiet``; see :func:`~.common.progress_callback`).
    """

    def decorate(f):
        @functools.wraps(f)  # copies __click_params__: the options declared below carry over
        def command(*args, quiet: bool, compute, **kwargs):
            from dataclasses import replace

            with progress_callback(label, quiet) as progress:
                return f(*args, compute=replace(compute, progress=progress), **kwargs)

        return quiet_option(command)

    return decorate


def renamed_option(old: str, new: str, dest: str, **attrs):
    """Accept the old spelling ``old`` of option ``new`` (parameter ``dest``), hidden from --help.

    Using it prints a deprecation note on stderr and fills ``dest`` (over a
    default of ``new``). Giving both spellings is a usage error (exit 2): which
    of the two values was meant cannot be known. Place it among the command's options.
    """
    hidden_dest = "renamed_" + old.lstrip("-").replace("-", "_")

    def decorate(f):
        @functools.wraps(f)  # copies __click_params__: the options declared below carry over
        def command(*args, **kwargs):
            value = kwargs.pop(hidden_dest)
            if value is not None:
                source = click.get_current_context().get_parameter_source(dest)
                if source not in (None, click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP):
                    raise click.UsageError(f"{old} and {new} are one option given twice; give {new} alone.")
                click.echo(f"warning: {old} is deprecated; use {new}.", err=True)
                kwargs[dest] = value
            return f(*args, **kwargs)

        return click.option(old, hidden_dest, hidden=True, default=None, **attrs)(command)

    return decorate


#: Reader names for ``--format`` (kept here, not imported from the library, so ``--help`` stays light).
ADAPTER_FORMATS = ("peft", "mlx", "kohya", "lycoris", "diffusers", "lora_diffusion", "state_dict")


def format_option(f):
    """Add ``--format NAME`` (passed as ``fmt``): force the adapter reader instead of detecting it."""
    return click.option("--format", "fmt", type=click.Choice(ADAPTER_FORMATS), default=None,
                        help="Adapter format; detected from file and tensor names when omitted (docs/formats.md).")(f)


def dask_options(work: str):
    """``--scheduler`` and ``--workers``: run ``work`` on Dask (collection, extract spell them the same)."""
    def decorate(f):
        f = click.option("--workers", type=click.IntRange(min=1),
                         help="Worker processes of --scheduler local (default 2).")(f)
        return click.option("--scheduler", metavar="local|tcp://HOST:8786",
                            help=f"Run the {work} on Dask: a local cluster, or a running scheduler (needs "
                                 "lora-lens[dist]).")(f)
    return decorate
