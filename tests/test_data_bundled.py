"""What the package bundles (lora_lens.data): found by name, licensed, readable, and a name wherever a path goes."""

from __future__ import annotations

import gzip
import json

import pytest

from lora_lens import ConfigError
from lora_lens.data import MODELS, TASKS, model_path, resolve_model, resolve_task, task_path

from .cli_utils import assert_bad_input, run


def test_bundled_files_with_their_licences():
    folder = model_path("stories260K")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "LICENSE"}
    assert "MIT License" in (folder / "LICENSE").read_text() and "Andrej" in (folder / "LICENSE").read_text()
    assert "llama2.c" in (folder.parent / "README.md").read_text()
    tasks = task_path("austen").parent
    assert "Julia Silge" in (tasks / "janeaustenr-LICENSE.txt").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in (tasks / "wordnet-LICENSE.txt").read_text()
    assert "Provenance" in (tasks / "README.md").read_text()
    for name, rows, classes in (("austen", 7308, 6), ("wordnet", 10000, 10)):
        lines = gzip.decompress(task_path(name).read_bytes()).decode().splitlines()
        objs = [json.loads(x) for x in lines]
        assert len(objs) == rows and len({o["label"] for o in objs}) == classes, name
        assert all(isinstance(o["text"], str) and o["text"] for o in objs), name


def test_names_resolve_and_paths_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model("stories260K") == model_path("stories260K")
    assert resolve_task("austen") == task_path("austen") and resolve_task(None) is None
    (tmp_path / "austen").write_text("mine")  # a file the user has, named like a bundled task, wins
    assert str(resolve_task("austen")) == "austen"
    assert str(resolve_model("./elsewhere")) == "./elsewhere"  # unknown: left for the caller's own message
    with pytest.raises(ConfigError, match="no bundled model named 'llama'"):
        model_path("llama")
    with pytest.raises(ConfigError, match="expected one of \\['austen', 'wordnet'\\]"):
        task_path("imdb")
    assert set(MODELS) == {"stories260K"} and set(TASKS) == {"austen", "wordnet"}


def test_open_base_and_cli_take_a_bundled_name(tmp_path, monkeypatch):
    from lora_lens import open_base

    monkeypatch.chdir(tmp_path)
    assert open_base("stories260K").num_parameters == 260_032
    r = run("inspect", "stories260K", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["totals"]["parameters"] == 260_032
    assert_bad_input(run("inspect", "stories261K"), "stories261K", "no such file")


def test_train_lm_on_the_bundled_model_by_name(tmp_path, monkeypatch):
    """The natural first command: an LM adapter on the bundled causal LM, no path anywhere."""
    monkeypatch.chdir(tmp_path)
    r = run("train", "--base", "stories260K", "--method", "lora", "--steps", "3", "-o", "out", "--json", "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["steps"] == 3 and (tmp_path / "out" / "adapter_config.json").is_file()
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"].endswith("stories260K")


@pytest.mark.slow  # tokenizing 7,308 paragraphs: about 10 s
@pytest.mark.realmodel
def test_train_classify_reads_a_bundled_task(tmp_path, monkeypatch, minilm_path):
    """``--data austen`` is the bundled file; ``--base all-MiniLM-L6-v2`` the installed MiniLM."""
    monkeypatch.chdir(tmp_path)
    r = run("train", "--base", "all-MiniLM-L6-v2", "--task", "classify", "--data", "austen", "--method", "head-only",
            "--steps", "1", "--batch-size", "2", "--max-length", "8", "--eval-fraction", "0.01", "-o", "c", "--json",
            "-q")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "c" / "classes.json").read_text()) is not None
    assert f'"data": "{task_path("austen")}"' in (tmp_path / "c" / "train_log.json").read_text()  # provenance
