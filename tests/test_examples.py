"""Every example runs as written: each `lora-lens …` line of every command's ``--help`` and of the docs' bash blocks.

The examples are read from where a user reads them (the help texts, README.md and docs/*.md), never copied
here. Each group (one command's help, one fenced bash block) runs top to bottom, in-process through the
click entry point, in a fresh copy of a workspace that holds what an example calls *your own* files
(``./my-adapter``, ``./seed0``, ``./r64``, an MLX folder, a kohya file, …); the README's blocks run in an
empty folder, as on a new user's machine. Bases and data are the bundled
names (``stories260K``, ``austen``, ``wordnet``) or the MiniLM of the README's install (``all-MiniLM-L6-v2``),
so nothing else is needed. ``tcp://head:8786`` (your Dask scheduler) is the address of a scheduler this test
starts. docs/results.md is left out: its commands are the measured runs, hours each, and name files that the
page itself cuts from the bundled tasks.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_lens_cli.main import main
from lora_lens_cli.reference import _walk

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in ("cli.md", "results.md"))]
SCHEDULER = "tcp://head:8786"


def _commands(lines: list[str]) -> list[str]:
    """Join ``\\`` continuations; keep the ``lora-lens …`` parts (also after ``&&``), comments dropped."""
    joined, buf = [], ""
    for line in lines:
        buf += line.strip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        joined.append(buf)
        buf = ""
    out = []
    for line in joined:
        for part in line.split("&&"):
            part = part.strip()
            if part.startswith("lora-lens "):
                out.append(part)
    return out


def help_examples() -> dict[str, list[str]]:
    """``{command path: [example, …]}`` from each command's ``--help`` (its "Examples:" block)."""
    groups = {}
    for ctx in _walk(main, "lora-lens", None):
        text = ctx.get_help()
        if "Examples:" not in text:
            continue
        block = text.split("Examples:", 1)[1].split("\n\n", 1)[0].splitlines()
        groups[ctx.command_path] = _commands(block)
    return groups


def doc_examples() -> dict[str, list[str]]:
    """``{"file:line": [example, …]}`` for every ```bash block of README.md and docs/*.md holding one."""
    groups = {}
    for path in DOCS:
        lines, block, start = path.read_text().splitlines(), None, 0
        for i, line in enumerate(lines, 1):
            fence = re.match(r"^\s*```(\S*)", line)
            if fence and block is None:
                block, start = ([] if fence.group(1) in ("bash", "sh", "console") else None), i
                if block is None:  # another language: skip to its closing fence
                    block = False
                continue
            if fence:
                if block:
                    cmds = _commands(block)
                    if cmds:
                        groups[f"{path.relative_to(ROOT)}:{start}"] = cmds
                block = None
                continue
            if block is not False and block is not None:
                block.append(line)
    return groups


HELP, DOC = help_examples(), doc_examples()
# Groups that train MiniLM or run the demo: a minute or more each on 2 cores (still run in CI).
SLOW = ("lora-lens compare-methods", "lora-lens demo", "lora-lens train", "README.md:", "docs/training.md:")


def test_the_examples_are_found():
    """Every command with --help examples is covered, and the docs' blocks are read (a parser gone blind fails)."""
    import click

    leaves = {ctx.command_path for ctx in _walk(main, "lora-lens", None) if not isinstance(ctx.command, click.Group)}
    assert set(HELP) == leaves and all(len(v) >= 1 for v in HELP.values()) and sum(map(len, HELP.values())) >= 40
    assert "lora-lens train" in HELP and any(c.startswith("lora-lens train --base stories260K") for c in HELP["lora-lens train"])
    assert any(k.startswith("README.md:") for k in DOC) and any(k.startswith("docs/training.md:") for k in DOC)
    everything = [c for v in [*HELP.values(), *DOC.values()] for c in v]
    assert not [c for c in everything if "../shared" in c or "./stories260K" in c or "Llama-2-7b" in c]


def _write_user_files(ws: Path) -> None:
    """What the examples call your own: adapters trained on the bundled model, other formats, data files."""
    from lora_lens.data import model_path, task_path
    from lora_lens.train import train

    stories = model_path("stories260K")
    common = dict(targets=["q_proj", "v_proj"], steps=6, batch_size=4, seq_len=16, device="cpu")
    train(stories, "lora", rank=8, alpha=16, seed=0, out=ws / "my-adapter", **common)
    train(stories, "lora", rank=8, alpha=16, seed=1, out=ws / "seed1", **common)
    train(stories, "lora", rank=64, alpha=128, seed=2, out=ws / "r64", **common)
    for name, src in (("seed0", "my-adapter"), ("r8", "my-adapter"), ("lora-run", "my-adapter"),
                      ("my-r64-adapter", "r64"), ("runs/seed0", "my-adapter"), ("runs/seed1", "seed1"),
                      ("adapters/a", "my-adapter"), ("adapters/b", "seed1"), ("adapters/c", "r64")):
        shutil.copytree(ws / src, ws / name)
    (ws / "adapters.txt").write_text("".join(f"adapters/{n}\n" for n in "abc"))
    r = CliRunner().invoke(main, ["collection", *(str(ws / "adapters" / n) for n in "abc"), "-o",
                                  str(ws / "my-collection"), "-q"])
    assert r.exit_code == 0, r.output
    # fine-tuned full checkpoints of the same base (cora's --source)
    for k, name in enumerate(("finetune-a", "finetune-b")):
        shutil.copytree(stories, ws / name)
        sd = load_file(ws / name / "model.safetensors")
        gen = torch.Generator().manual_seed(k)
        sd = {n: t + 0.01 * torch.randn(t.shape, generator=gen) if n.endswith("proj.weight") else t
              for n, t in sd.items()}
        save_file(sd, ws / name / "model.safetensors", metadata={"format": "pt"})
    # an MLX-LM adapter folder and a kohya / sd-scripts file (convert)
    gen = torch.Generator().manual_seed(0)
    mlx = {f"model.layers.{i}.self_attn.{p}.lora_{ab}": torch.randn(*((64, 4) if ab == "a" else (4, 64)), generator=gen)
           for i in range(2) for p in ("q_proj", "v_proj") for ab in "ab"}
    (ws / "mlx-adapters").mkdir()
    save_file(mlx, ws / "mlx-adapters" / "adapters.safetensors")
    (ws / "mlx-adapters" / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}))
    kohya = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{kohya}.lora_down.weight": torch.randn(4, 32, generator=gen),
               f"{kohya}.lora_up.weight": torch.randn(32, 4, generator=gen), f"{kohya}.alpha": torch.tensor(2.0)},
              ws / "style_lora.safetensors", metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    # token ids for the LM task, and a small labelled file of your own (real text: the first Austen rows)
    (ws / "ids.jsonl").write_text("".join(json.dumps({"input_ids": torch.randint(0, 512, (70,), generator=gen).tolist()})
                                          + "\n" for _ in range(60)))
    rows = gzip.decompress(task_path("austen").read_bytes()).decode().splitlines()[:120]
    (ws / "my-labels.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("examples-template")
    _write_user_files(ws)
    return ws


@pytest.fixture(scope="module")
def scheduler():
    """A running Dask scheduler standing in for the user's ``tcp://head:8786``."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def run_example(line: str, cwd: Path, address: str | None) -> None:
    """One example as a shell would run it: words, ``*`` globs, ``> file``; fails with its output."""
    words = shlex.split(line, comments=True)
    assert words[0] == "lora-lens", line
    target = None
    if ">" in words:
        i = words.index(">")
        words, target = words[:i], words[i + 1]
    args = []
    for w in words[1:]:
        if SCHEDULER in w:
            assert address is not None, line
            w = w.replace(SCHEDULER, address)
        args += sorted(glob.glob(w, root_dir=cwd)) or [w] if "*" in w else [w]
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, f"{line}\n{r.stdout}\n{r.stderr}"
    if target:
        (cwd / target).write_text(r.stdout)
    if "--json" in args and not target:
        json.loads(r.stdout)  # one JSON object


def _params(groups: dict[str, list[str]]):
    return [pytest.param(k, marks=[pytest.mark.slow, pytest.mark.realmodel] if k.startswith(SLOW) else [], id=k)
            for k in groups]


def _run_group(cmds, workspace, tmp_path, monkeypatch, request, fresh: bool = False):
    """``fresh``: an empty folder, as a new user's (the README's first commands write ./my-adapter themselves)."""
    ws = tmp_path / "ws"
    if fresh:
        ws.mkdir()
    else:
        shutil.copytree(workspace, ws)
    monkeypatch.chdir(ws)
    address = request.getfixturevalue("scheduler") if any(SCHEDULER in c for c in cmds) else None
    for line in cmds:
        run_example(line, ws, address)


@pytest.mark.parametrize("group", _params(HELP))
def test_help_examples_run(group, workspace, tmp_path, monkeypatch, request):
    _run_group(HELP[group], workspace, tmp_path, monkeypatch, request)


@pytest.mark.parametrize("group", _params(DOC))
def test_doc_examples_run(group, workspace, tmp_path, monkeypatch, request):
    _run_group(DOC[group], workspace, tmp_path, monkeypatch, request, fresh=group.startswith("README.md:"))
