"""Running the CLI in tests and checking its one-line bad-input errors (exit 2, no traceback)."""

from __future__ import annotations

from click.testing import CliRunner

from lora_lens_cli.main import main


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def assert_bad_input(result, *needles: str) -> str:
    """A CLI refusal: exit 2, exactly one ``error: …`` line on stderr holding every needle, no traceback.

    ``result`` is a CliRunner result or a ``subprocess.CompletedProcess``; returns the line.
    """
    stderr = result.stderr if hasattr(result, "exit_code") else result.stderr.decode(errors="replace")
    code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert code == 2, (code, stderr)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
