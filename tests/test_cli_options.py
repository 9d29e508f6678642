"""The CLI as a whole: start-up imports, one spelling per option, --quiet, renamed options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_lens_cli.main import main

from .cli_utils import assert_bad_input

ROOT = Path(__file__).resolve().parents[1]


def _imported_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter on this checkout; the heavy packages it imported."""
    probe = code + "\nimport sys\nprint(sorted(m for m in sys.modules if m.split('.')[0] in " \
        "('torch', 'matplotlib', 'transformers', 'peft', 'sklearn', 'scipy')) and sorted({m.split('.')[0] " \
        "for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib', 'transformers', 'peft', 'sklearn', " \
        "'scipy')}))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return eval(out.stdout.strip().splitlines()[-1])


def _commands():
    """(path, command) of every command and sub-command, loaded through the lazy groups."""
    def walk(cmd, path, parent):
        ctx = click.Context(cmd, info_name=path[-1], parent=parent)
        yield " ".join(path), cmd
        if isinstance(cmd, click.Group):
            for name in cmd.list_commands(ctx):
                yield from walk(cmd.get_command(ctx, name), path + [name], ctx)
    return dict(walk(main, ["lora-lens"], None))


def test_help_imports_neither_torch_nor_matplotlib():
    # every command's --help (the reference renders them all) and the top-level --help, in one process
    code = ("from cli.reference import render_cli_reference\nfrom cli.main import main\n"
            "render_cli_reference()\ntry:\n    main(['--help'], prog_name='lora-lens')\nexcept SystemExit:\n    pass")
    assert _imported_after(code) == []


def test_spectrum_imports_torch_but_not_matplotlib(llama_adapter):
    code = (f"from cli.main import main\ntry:\n    main(['spectrum', {str(llama_adapter[1])!r}, '--json'], "
            "prog_name='lora-lens')\nexcept SystemExit as e:\n    assert e.code == 0, e.code")
    assert _imported_after(code) == ["torch"]


def test_one_spelling_per_option():
    commands = _commands()
    by_name: dict[str, dict[str, click.Option]] = {}
    for path, cmd in commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                by_name.setdefault(p.name, {})[path] = p
    # whatever writes a file or folder takes -o/--out and nothing else
    assert {path: p.opts for path, p in by_name["out"].items()} == {
        path: ["-o", "--out"] for path in by_name["out"]}
    assert set(by_name["out"]) == {"lora-lens " + c for c in (
        "collection", "compare-methods", "condlora init", "convert", "cora basis", "cora init", "demo", "extract",
        "intruders", "merge", "pissa", "reduce", "report", "resize", "train")}
    # one decorator each: the same flags, help and default on every command
    by_name["overwrite"].pop("lora-lens demo")  # --overwrite/--no-overwrite, on by default: its own folder
    for name in ("as_json", "seed", "overwrite", "quiet", "device", "dtype"):
        spellings = {(tuple(p.opts), p.help, p.default) for p in by_name[name].values()}
        assert len(spellings) == 1, (name, spellings)
    assert set(by_name["as_json"]) == {path for path, c in commands.items() if not isinstance(c, click.Group)}
    assert {p.type.min for p in by_name["epsilon"].values()} == {0} and len(by_name["epsilon"]) == 3
    assert {tuple(p.opts) for p in by_name["n_iter"].values()} == {("--n-iter",)}
    # progress bars on the long commands, off with --quiet: every command that computes (takes --device) has it
    assert {"lora-lens " + c for c in ("alignment", "report", "spectrum", "cora basis", "cora init", "train",
                                       "demo", "similarity", "reduce", "pissa", "condlora analyze",
                                       "condlora init")} <= set(by_name["quiet"])
    assert set(by_name["device"]) <= set(by_name["quiet"])
    # how many top singular directions: --top-k wherever a command takes such a k
    assert {tuple(p.opts) for p in by_name["top_k"].values()} == {("--top-k",)}
    assert {"lora-lens " + c for c in ("similarity", "alignment", "report", "collection")} <= set(by_name["top_k"])
    visible = {o for c in commands.values() for p in c.params if not getattr(p, "hidden", False) for o in p.opts}
    assert not {"--niter", "--output", "--n_iter", "--k", "--intruder-k"} & visible


def test_quiet_turns_the_progress_bar_off(llama_adapter, monkeypatch):
    import lora_lens_cli.common

    monkeypatch.setattr(lora_lens_cli.common, "_isatty", lambda stream: True)
    loud = CliRunner().invoke(main, ["spectrum", str(llama_adapter[1]), "--json"])
    quiet = CliRunner().invoke(main, ["spectrum", str(llama_adapter[1]), "--json", "--quiet"])
    assert loud.exit_code == quiet.exit_code == 0
    assert "decomposing LoRA modules" in loud.stderr and quiet.stderr == ""
    assert json.loads(loud.stdout) == json.loads(quiet.stdout)


@pytest.mark.parametrize("command", ["similarity", "reduce"])
def test_quiet_on_the_commands_that_lacked_it(llama_adapter, monkeypatch, tmp_path, command):
    import lora_lens_cli.common

    monkeypatch.setattr(lora_lens_cli.common, "_isatty", lambda stream: True)
    args = [command, str(llama_adapter[1]), "--json"] + (["--rank", "2", "-o"] if command == "reduce" else [])
    loud = CliRunner().invoke(main, args + ([str(tmp_path / "loud")] if command == "reduce" else []))
    quiet = CliRunner().invoke(main, args + ([str(tmp_path / "quiet")] if command == "reduce" else []) + ["-q"])
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "decomposing LoRA modules" in loud.stderr and quiet.stderr == ""
    strip = (lambda d: {k: v for k, v in d.items() if k not in ("out_dir", "written")})
    assert strip(json.loads(loud.stdout)) == strip(json.loads(quiet.stdout))


def test_renamed_niter_still_works_and_says_so(tiny_llama, tmp_path):
    args = ["pissa", "--base", str(tiny_llama[1]), "--rank", "2", "--targets", "q_proj"]
    old = CliRunner().invoke(main, [*args, "--niter", "3", "-o", str(tmp_path / "old")])
    new = CliRunner().invoke(main, [*args, "--n-iter", "3", "-o", str(tmp_path / "new")])
    assert old.exit_code == new.exit_code == 0, old.output
    assert "--niter is deprecated; use --n-iter" in old.stderr and "deprecated" not in new.stderr
    recorded = [json.loads((tmp_path / d / "lora_lens_init.json").read_text()) for d in ("old", "new")]
    assert recorded[0] == recorded[1] and "3" in json.dumps(recorded[0])


def _public_names() -> dict[str, set[str]]:
    """What the library exports: ``lora_lens.__all__`` and each sub-package's ``__init__`` ``__all__``."""
    import importlib

    import lora_lens

    public = {"lora_lens": set(lora_lens.__all__)}
    for init in sorted((ROOT / "lora_lens").glob("*/__init__.py")):
        name = f"lora_lens.{init.parent.name}"
        public[name] = set(importlib.import_module(name).__all__)
    return public


def test_cli_imports_only_the_public_api():
    """cli/ imports names that lora_lens/__init__.py or a lora_lens/<sub-package>/__init__.py exports, nothing deeper."""
    import ast

    public = _public_names()
    bad = []
    for path in sorted((ROOT / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                        if a.name.split(".")[0] == "lora_lens" and a.name not in public]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "lora_lens":
                if node.module not in public:
                    bad.append(f"{path.name}:{node.lineno} from {node.module}")
                else:
                    bad += [f"{path.name}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if a.name not in public[node.module]]
    assert not bad, "cli/ reaches past the public API:\n" + "\n".join(bad)


def test_train_methods_match_the_library():
    from lora_lens.train import METHODS
    from lora_lens_cli.train_cmd import METHODS as CLI_METHODS

    assert CLI_METHODS == METHODS


def test_train_task_defaults_match_the_library():
    from lora_lens.train.config import TASK_DEFAULTS, TASKS
    from lora_lens_cli.train_cmd import TASK_DEFAULTS as CLI_DEFAULTS, TASKS as CLI_TASKS

    assert CLI_DEFAULTS == TASK_DEFAULTS and CLI_TASKS == TASKS


def test_wheel_installs_lora_lens_cli_and_no_cli_package(tmp_path):
    """The built wheel: lora_lens (every sub-package), lora_lens_cli, the console script, nothing named cli."""
    import shutil
    import zipfile

    import pytest

    if not _can_build_wheels():
        pytest.skip("no bdist_wheel here (setuptools < 70 without the wheel package)")
    src = tmp_path / "src"  # a copy, so that the build's build/ and egg-info stay out of the checkout
    for name in ("lora_lens", "cli"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"lora_lens", "lora_lens_cli"}
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "lora_lens").rglob("__init__.py")}
    assert {p + "/__init__.py" for p in packages} <= set(names)
    assert {"lora_lens_cli/" + p.name for p in (ROOT / "cli").glob("*.py")} <= set(names)
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "lora-lens = lora_lens_cli.main:main" in entry
    # the bundled model and tasks with their licences: a fresh install needs nothing beside it
    bundled = {str(p.relative_to(ROOT)) for p in (ROOT / "lora_lens" / "data").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {"lora_lens/data/models/stories260K/model.safetensors", "lora_lens/data/models/stories260K/LICENSE",
            "lora_lens/data/tasks/austen-paragraphs.jsonl.gz", "lora_lens/data/tasks/wordnet-LICENSE.txt"} <= bundled
    assert bundled <= set(names), f"missing from the wheel: {sorted(bundled - set(names))}"


def _can_build_wheels() -> bool:
    import importlib.util

    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    return importlib.util.find_spec("wheel") is not None or int(setuptools.__version__.split(".")[0]) >= 70


def test_json_output_is_strict_json(capsys):
    """NaN/Inf (a zero update's effective rank, an undefined ratio) print as null: every JSON reader parses it."""
    import torch

    from lora_lens_cli.common import echo_json

    echo_json({"nan": float("nan"), "t": torch.tensor([1.0, float("inf")]), "n": torch.tensor(3)})
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c)) == {
        "nan": None, "t": [1.0, None], "n": 3}


def test_old_and_new_spelling_together_is_refused(tiny_llama, tmp_path):
    """``--niter 3 --n-iter 5`` names one setting twice with two values: one line, exit 2, nothing written
    (silently keeping one of them hid a typo in a script)."""
    args = ["pissa", "--base", str(tiny_llama[1]), "--rank", "2", "--targets", "q_proj", "-o", str(tmp_path / "o")]
    line = assert_bad_input(CliRunner().invoke(main, [*args, "--niter", "3", "--n-iter", "5"]), "--niter", "--n-iter")
    assert "deprecated" not in line and not (tmp_path / "o").exists()


def test_init_summaries_print_floats_like_the_tables(llama_adapter, tmp_path):
    """reduce's summary line: energy_kept_min to 4 significant digits, not Python's 17-digit repr."""
    r = CliRunner().invoke(main, ["reduce", str(llama_adapter[1]), "--rank", "1", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    summary = r.stdout.splitlines()[1]
    value = summary.split("energy_kept_min ")[1].split(",")[0]
    assert len(value.replace("0.", "", 1)) <= 4 and 0 < float(value) <= 1, summary


@pytest.mark.parametrize("argv", [["collection", "a", "b"], ["reduce", "a", "--rank", "1"],
                                  ["convert", "a"], ["report", "a"]])
def test_missing_out_is_a_usage_error(argv):
    """``-o`` is required where there is no default: click 8.5 stopped enforcing ``required=True`` next to an
    explicit ``default=None``, and collection then failed with an internal TypeError on ``Path(None)``."""
    assert_bad_input(CliRunner().invoke(main, argv), "Missing option '-o'")


def test_a_max_memory_under_one_mib_is_named(llama_adapter):
    """--max-memory 1KB (1GB mistyped) is said on stderr, once, with the likely meaning; the numbers do not change."""
    r = CliRunner().invoke(main, ["spectrum", str(llama_adapter[1]), "--json", "--max-memory", "1KB"])
    ok = CliRunner().invoke(main, ["spectrum", str(llama_adapter[1]), "--json", "--max-memory", "1GB"])
    assert r.exit_code == ok.exit_code == 0
    warning = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and "under the 1 MiB" in warning[0] and "Did you mean 1GB?" in warning[0], r.stderr
    assert "warning" not in ok.stderr
    assert r.stdout == ok.stdout
