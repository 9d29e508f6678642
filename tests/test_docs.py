"""Docs that must stay true: the CLI reference and the README's commands."""

from pathlib import Path

from lora_lens_cli.reference import render_cli_reference

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == render_cli_reference(), "docs/cli.md is stale: run `python -m lora_lens_cli.reference > docs/cli.md`"


def test_readme_names_every_command():
    readme = (ROOT / "README.md").read_text()
    from lora_lens_cli.main import main

    for name in main.list_commands(None):
        assert f"lora-lens {name}" in readme, f"README does not mention `lora-lens {name}`"
