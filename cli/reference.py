"""Render the CLI reference (docs/cli.md) from the commands' own ``--help``.

``python -m lora_lens_cli.reference > docs/cli.md`` regenerates it; a test checks it is current.
"""

from __future__ import annotations

import click

from .main import main


def _walk(cmd: click.Command, name: str, parent: click.Context | None):
    """Yield a Context for every command, chained so sub-commands inherit settings (``-h``)."""
    ctx = click.Context(cmd, info_name=name, parent=parent, terminal_width=100, max_content_width=100,
                        **(cmd.context_settings if parent is None else {}))
    yield ctx
    if isinstance(cmd, click.Group):
        for sub in cmd.list_commands(ctx):  # sorted; loads lazy sub-commands
            yield from _walk(cmd.get_command(ctx, sub), sub, ctx)


def render_cli_reference() -> str:
    parts = [
        "# CLI reference",
        "",
        "Generated from `--help` by `python -m lora_lens_cli.reference > docs/cli.md`; a test keeps it current.",
        "",
        "The examples run as written after the README's install (tests/test_examples.py runs every one). Bases and",
        "data named `stories260K`, `all-MiniLM-L6-v2`, `austen` and `wordnet` come with the package (lora_lens.data)",
        "or the `demo` extra; `./my-adapter`, `./seed0`, `./seed1`, `./r8`, `./r64`, `./runs`, `./adapters/` and",
        "the like stand for your own adapters, for example `lora-lens train --base stories260K --method lora -o",
        "my-adapter`; `./my-collection` is what `lora-lens collection` writes.",
        "",
    ]
    for ctx in _walk(main, "lora-lens", None):
        parts += [f"## `{ctx.command_path}`", "", "```text", ctx.get_help().rstrip(), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    click.echo(render_cli_reference(), nl=False)
