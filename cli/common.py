"""What every command shares: lazy loading and error handling, JSON output, plain tables, progress bars.

Imports click and the library's error classes only; commands import the library
inside their functions, so ``--help`` never imports torch or matplotlib.
"""

from __future__ import annotations

import importlib
import json
import re
import traceback
import warnings
from contextlib import contextmanager

import click

from lora_lens import DiskFullError, LoraLensError  # lazy names: imports lora_lens.errors alone

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


class LazyGroup(click.Group):
    """A click group whose sub-commands are imported when first used (click's documented lazy-group pattern).

    ``lazy_subcommands``: name → ``"module:attribute"``, the module relative to
    this package; ``lora-lens spectrum`` then imports the spectrum command's
    module alone.
    """

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_subcommands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy_subcommands:
            return super().get_command(ctx, cmd_name)
        module, attr = self.lazy_subcommands[cmd_name].split(":")
        cmd = getattr(importlib.import_module(module, __package__), attr)
        if not isinstance(cmd, click.Command):  # a wrong table entry is a bug, say where
            raise TypeError(f"{module}:{attr} is not a click command")
        return cmd


class LoraLensGroup(LazyGroup):
    """The top-level group: lazy sub-commands, and errors turned into one line and an exit code.

    ``LoraLensError`` and click's usage errors (bad input) → exit 2; disk full → exit 1 and one line;
    any other exception (a bug) → exit 1 and a hint to rerun with ``--debug``, which prints the traceback.
    """

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad option value or a missing argument is bad input too: one line
            where = " ".join(["lora-lens", *(e.ctx.command_path.split()[1:] if e.ctx else [])])
            click.echo(f"error: {_one_line(e.format_message())} (see {where} --help)", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except LoraLensError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(e))}", err=True)
            ctx.exit(EXIT_BAD_INPUT)
        except DiskFullError as e:  # not bad input, not a bug: the run could not finish writing
            click.echo(f"error: {_one_line(e.strerror or str(e))}", err=True)
            ctx.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug, not bad input
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(
                f"internal error: {type(e).__name__}: {_one_line(str(e))} (rerun as lora-lens --debug COMMAND … for the traceback "
                "and report it)",
                err=True,
            )
            ctx.exit(EXIT_FAILURE)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def echo_json(obj) -> None:
    """Print one JSON object on stdout: strict JSON (NaN/Inf → null) through the library's one converter.

    Indented for a terminal; compact when piped or redirected, where it is read by a program: ``indent``
    makes ``json`` fall back from its C encoder to the pure-Python one (0.04 s of a 0.06 s overhead on a
    224-module spectrum, benchmarks/bench_cli.py).
    """
    import sys

    from lora_lens import to_jsonable

    indent = 2 if sys.stdout.isatty() else None
    click.echo(json.dumps(to_jsonable(obj), indent=indent, allow_nan=False))


def table(rows: list[list], header: list[str]) -> str:
    """A plain left-aligned text table (numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if numeric[i] and j else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if x is None:
        return "-"
    return str(x)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def echo_warnings(caught) -> None:
    """Library warnings (``warnings.warn``) as one ``warning: …`` line each on stderr."""
    for w in caught:
        click.echo(f"warning: {_one_line(str(w.message))}", err=True)


@contextmanager
def warnings_as_they_come():
    """Print each distinct library warning as one ``warning: …`` line on stderr the moment it is raised.

    For long commands (compare-methods) whose warnings, such as truncation, arise in the first minute:
    collecting them for the end would show them an hour late. A message already shown is not repeated
    (every run of a comparison re-reads the same data).
    """
    seen: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = _one_line(str(message))
        if text not in seen:
            seen.add(text)
            click.echo(f"\nwarning: {text}" if _isatty(click.get_text_stream("stderr")) else f"warning: {text}",
                       err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        yield


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000 ** 2, "mb": 1000 ** 2, "g": 1000 ** 3, "gb": 1000 ** 3,
               "t": 1000 ** 4, "tb": 1000 ** 4, "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4}


def parse_size(text: str) -> int:
    """``2GB`` → 2·10⁹, ``512MiB`` → 512·2²⁰, ``1.5G`` → 1.5·10⁹, ``4096`` → 4096 bytes (case-insensitive)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; expected e.g. 2GB, 512MiB or a number of bytes.")
    n = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if n <= 0:
        raise ValueError(f"{text!r}: expected a positive size.")
    return n


#: The smallest --max-memory that is a budget rather than a slip: 1 MiB holds one 512 × 512 float32 matrix.
#: Below it every chunk is one module, the slowest plan (the numbers do not change), and a value such as
#: 1KB is almost always 1GB mistyped, so it is named on stderr.
MIN_USEFUL_MEMORY = 1 << 20


class ByteSize(click.ParamType):
    """A click option type for memory budgets such as ``2GB`` or ``512MiB`` (bytes as an int).

    A budget under :data:`MIN_USEFUL_MEMORY` is accepted (it forces one module
    per chunk, which the tests use) with one warning line on stderr.
    """

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            n = parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        if n < MIN_USEFUL_MEMORY:
            name = param.opts[0] if param is not None else "the size"
            number = re.match(r"\s*([0-9.]+)\s*k", value, re.IGNORECASE)  # 1KB: most likely 1GB mistyped
            hint = f" Did you mean {number.group(1)}GB?" if number else ""
            click.echo(f"warning: {name} {value} is {human_bytes(n)}, under the 1 MiB a useful budget needs: every "
                       f"chunk holds one module, the slowest plan (the numbers do not change).{hint}", err=True)
        return n


@contextmanager
def progress_callback(label: str, quiet: bool = False, min_items: int = 100):
    """Yield a ``progress(done, total, what)`` callback that draws ``click.progressbar`` on stderr.

    Drawn when stderr is a terminal, or when the run is long (``total ≥
    min_items``; a non-terminal then gets the label once, click's behaviour);
    never with ``quiet``. The bar opens at the first call, so errors raised
    while loading print alone, and closes when ``done`` reaches ``total`` (a
    later call, e.g. the next adapter's, opens a new one). Never writes to
    stdout, so ``--json`` output stays one object.
    """
    state: dict = {}
    err = click.get_text_stream("stderr")

    def callback(done: int, total: int, what: str) -> None:
        if "bar" not in state:
            show = not quiet and (_isatty(err) or total >= min_items)
            state["bar"] = click.progressbar(length=total, label=label, file=err, item_show_func=lambda x: x,
                                             show_pos=True) if show else None
            if state["bar"] is not None:
                state["bar"].__enter__()
                state["done"] = 0
        bar = state["bar"]
        if bar is not None:
            bar.update(done - state["done"], what)
            state["done"] = done
            if done >= total:  # finished: end the line now, before the command prints its result
                state.pop("bar").__exit__(None, None, None)
        elif done >= total:
            state.pop("bar")  # a later phase (the next adapter) decides again

    try:
        yield callback
    finally:
        if state.get("bar") is not None:
            state["bar"].__exit__(None, None, None)


def is_terminal() -> bool:
    """stderr is a terminal (where progress bars are drawn)."""
    return _isatty(click.get_text_stream("stderr"))


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
