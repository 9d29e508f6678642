"""Running the CLI in tests and checking its one-line bad-input errors (exit 2, no traceback)."""

from __future__ import annotations

from click.testing import CliRunner

from lora_lens_cli.main import main


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_bad_input(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]
