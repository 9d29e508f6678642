"""Same inputs and seed → byte-identical outputs: run each command twice (and under other chunking/threads), compare bytes.

The one declared exception: ``train_log.json``'s measurements of the run itself (``wall_time_s``,
``tokens_per_s``, ``train_time_s``, ``time_per_step_s``, ``peak_memory_bytes``; docs/guarantees.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lora_lens_cli.main import main

from .hostile_files import write_adapter

TIMINGS = ("wall_time_s", "tokens_per_s", "train_time_s", "time_per_step_s", "peak_memory_bytes")


def invoke(args: list) -> str:
    r = CliRunner().invoke(main, list(map(str, args)))
    assert r.exit_code == 0, r.output
    return r.stdout


def snapshot(folder: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "train_log.json":
                log = json.loads(data)
                data = json.dumps({k: v for k, v in log.items() if k not in TIMINGS}).encode()
            out[str(p.relative_to(folder))] = data
    return out


@pytest.mark.parametrize("command", [
    ["cora", "init", "--rank", "4", "--targets", "q_proj,v_proj", "--mode", "init"],
    ["condlora", "init", "--rank", "4", "--targets", "q_proj"],
    ["train", "--method", "lora", "--steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-fraction", "0.02"],
    ["report"],
])
def test_same_command_twice_gives_the_same_bytes(stories_path, tmp_path, command):
    out = tmp_path / "out"
    if command == ["report"]:
        args = ["report", write_adapter(tmp_path / "adapter"), "-o", out]
    else:
        args = [*command, "--base", stories_path, "--seed", "3", "-o", out]
    first_stdout = invoke(args)
    first = snapshot(out)
    assert first
    second_stdout = invoke([*args, "--overwrite"])
    second = snapshot(out)
    assert second.keys() == first.keys()
    assert [k for k in first if first[k] != second[k]] == []
    if command[0] in ("cora", "condlora"):
        assert first_stdout == second_stdout


def test_safetensors_metadata_order_is_fixed(tmp_path):
    from lora_lens.io import atomic_save_safetensors

    t = {"b": torch.ones(2, 3), "a": torch.zeros(4, dtype=torch.float64)}
    atomic_save_safetensors(t, tmp_path / "x.safetensors", {"z": "1", "m": "2", "a": "3"})
    atomic_save_safetensors(dict(reversed(t.items())), tmp_path / "y.safetensors", {"a": "3", "m": "2", "z": "1"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()


@pytest.mark.parametrize("command", [["spectrum", "--json"], ["inspect", "--json"]])
def test_json_identical_across_chunking_and_threads(llama_adapter, command):
    args = [command[0], llama_adapter[1], *command[1:]]
    reference = invoke(args)
    variants = [["--max-memory", "4KiB"], ["--max-memory", "1GB"]] if command[0] == "spectrum" else [[]]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for extra in variants:
                assert invoke([*args, *extra]) == reference, (threads, extra)
    finally:
        torch.set_num_threads(before)


def test_cora_basis_files_identical_for_every_max_memory(stories_path, tmp_path):
    """Each layer's range-finder sketch is seeded by its name: --max-memory (one layer a chunk here) changes no byte.

    Before per-item seeds one sketch was drawn per chunk; at --n-iter 1 the bases then differed visibly.
    """
    outs = []
    for i, extra in enumerate([[], ["--max-memory", "4KiB"]]):
        out = tmp_path / f"basis{i}"
        invoke(["cora", "basis", "--base", stories_path, "--rank", "4", "--targets", "q_proj,v_proj", "--n-iter", "1",
                "-o", out, *extra])
        outs.append(snapshot(out))
    assert outs[0] and outs[0] == outs[1]
