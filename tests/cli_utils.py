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


def assert_stamped(obj, kind: str | None = None) -> dict:
    """A top-level JSON result: ``kind`` (documented in docs/formats.md, "JSON results"), ``lora_lens_version``
    (this one) and the kind's integer ``schema``, as the first three keys. Returns ``obj``."""
    import lora_lens
    from lora_lens.jsonable import SCHEMAS

    assert isinstance(obj, dict) and list(obj)[:3] == ["kind", "lora_lens_version", "schema"], list(obj)[:5]
    assert kind is None or obj["kind"] == kind, (obj["kind"], kind)
    assert obj["lora_lens_version"] == lora_lens.__version__
    assert isinstance(obj["schema"], int) and obj["schema"] == SCHEMAS[obj["kind"]] >= 1
    assert f"| `{obj['kind']}` | {obj['schema']} |" in formats_doc(), f"kind {obj['kind']!r} not in docs/formats.md"
    return obj


def formats_doc() -> str:
    from pathlib import Path

    return (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text(encoding="utf-8")
