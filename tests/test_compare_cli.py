"""``lora-lens similarity`` and ``lora-lens alignment``: output, JSON, and bad input (exit 2, one line)."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from .cli_utils import assert_bad_input, run


def test_similarity_one_adapter_table_and_json(llama_adapter):
    r = run("similarity", llama_adapter[1], "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "self_attn.q_proj  d=32  k=2,4  (3 layers)" in r.output and "expected 0.125" in r.output
    r = run("similarity", llama_adapter[1], "--what", "A", "--top-k", "2", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "layer_similarity" and d["what"] == "A" and d["side"] == "in" and d["k"] == 2
    g = d["grids"][0]
    assert g["blocks"] == [0, 1, 2] and len(g["phi"]) == 3 and g["k"] == [2, 2, 2]
    assert set(g["summary"]) >= {"mean_offdiag", "random_mean_offdiag", "expected_mean_offdiag", "deep_mean_offdiag"}


def test_similarity_base_needs_base_and_works_with_it(llama_adapter, tiny_llama):
    assert_bad_input(run("similarity", llama_adapter[1], "--what", "base"), "--base")
    r = run("similarity", llama_adapter[1], "--what", "base", "--base", tiny_llama[1], "--top-k", "3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["grids"][0]["k"] == [3, 3, 3]


def test_similarity_pairs(llama_adapter, tmp_path):
    r = run("similarity", llama_adapter[1], llama_adapter[1], "--dtype", "float64")
    assert r.exit_code == 0, r.output
    assert "9 matched modules: mean φ 1.000" in r.output
    r = run("similarity", llama_adapter[1], llama_adapter[1], llama_adapter[1], "--json")
    d = json.loads(r.stdout)
    assert d["kind"] == "pairwise_similarity" and len(d["pairs"]) == 3
    m = d["pairs"][0]["modules"][0]
    assert m["phi"] == pytest.approx(1.0, abs=1e-5) and len(m["grid"]) == m["k_a"] and len(m["grid"][0]) == m["k_b"]
    assert {"phi", "phi_full", "grid", "grassmann"} <= set(m["random"]) and {"phi", "grid"} <= set(m["expected"])
    assert_bad_input(run("similarity", llama_adapter[1], llama_adapter[1], "--what", "base", "--base", "x"))


def test_similarity_bad_input(llama_adapter, tmp_path):
    assert_bad_input(run("similarity", tmp_path / "nope"), "nope")
    assert_bad_input(run("similarity", llama_adapter[1], "--device", "tpu"), "device")
    assert_bad_input(run("similarity", llama_adapter[1], "--what", "base", "--base", llama_adapter[1]),
                     "adapter folder")
    r = run("similarity", llama_adapter[1], "--what", "C")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_alignment_table_and_json_sweep(llama_adapter, tiny_llama):
    r = run("alignment", llama_adapter[1], "--base", tiny_llama[1])
    assert r.exit_code == 0, r.output
    assert "amplif." in r.output and "intr. ε=0.5" in r.output and "model.layers.2.mlp.down_proj" in r.output
    assert "among the top-10 singular vectors" in r.output
    r = run("alignment", llama_adapter[1], "--base", tiny_llama[1], "--epsilon", "0.3", "--epsilon", "0.7",
            "--top-k", "4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    it, al = d["intruders"], d["alignment"]
    assert it["epsilons"] == [0.3, 0.7] and it["k"] == 4 and len(it["totals"]) == 2
    assert sum(m["counts"][1] for m in it["modules"]) == it["totals"][1]
    assert len(it["modules"][0]["max_cos"]) == 4
    row = al["modules"][0]
    assert row["amplification"] == pytest.approx(row["delta_norm"] / row["proj_delta"])
    assert {"w0_norm", "proj_w0", "proj_random", "rank", "weight", "block", "module_type"} <= set(row)


def test_alignment_bad_input(llama_adapter, tiny_llama, tiny_gpt2, tmp_path):
    assert_bad_input(run("alignment", llama_adapter[1], "--base", tiny_gpt2[1]), "no weight for", "--base")
    r = run("alignment", llama_adapter[1])  # --base is required: click's usage error
    assert r.exit_code == 2 and "--base" in r.stderr and "Traceback" not in r.output
    state = load_file(Path(tiny_llama[1]) / "model.safetensors")
    name = "model.layers.0.self_attn.v_proj.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("inf")
    save_file(state, tmp_path / "model.safetensors")
    assert_bad_input(run("alignment", llama_adapter[1], "--base", tmp_path), name, "NaN/Inf")
    r = run("alignment", llama_adapter[1], "--base", tiny_llama[1], "--epsilon", "1.5")
    assert r.exit_code == 2 and "Traceback" not in r.output


def test_help_has_examples():
    for cmd in ("similarity", "alignment"):
        r = run(cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output and "--device" in r.output and "--dtype" in r.output


def test_similarity_reports_the_k_it_used_and_warns_once_when_clipped(llama_adapter):
    """k above every rank (4, and 2 for one q_proj): header and JSON say the k used, one warning names the ranks."""
    r = run("similarity", llama_adapter[1], "--top-k", "100")
    assert r.exit_code == 0, r.output
    head = r.stdout.splitlines()[0]
    assert "k = 2–4" in head and "100" not in head, head
    warn = [ln for ln in r.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "k=100" in warn[0] and "exceeds the module rank in" in warn[0] and warn[0].endswith("clipped to it (2, 4)."), r.stderr
    assert llama_adapter[1].name in warn[0]
    d = json.loads(run("similarity", llama_adapter[1], "--top-k", "100", "--json").stdout)
    assert d["k"] == 4 and d["k_requested"] == 100
    pair = run("similarity", llama_adapter[1], llama_adapter[1], "--top-k", "100")
    assert pair.exit_code == 0 and "k = 2–4" in pair.stdout.splitlines()[0], pair.output
    assert len([ln for ln in pair.stderr.splitlines() if ln.startswith("warning:")]) == 1, pair.stderr
    within = run("similarity", llama_adapter[1], "--top-k", "2")
    assert "k = 2" in within.stdout.splitlines()[0] and "warning" not in within.stderr


def test_old_k_spellings_still_work_and_say_so(llama_adapter, tiny_llama):
    old = run("similarity", llama_adapter[1], "--what", "A", "--k", "2", "--json")
    assert old.exit_code == 0 and "--k is deprecated; use --top-k" in old.stderr, old.output
    assert json.loads(old.stdout)["k"] == 2
    old = run("alignment", llama_adapter[1], "--base", tiny_llama[1], "--intruder-k", "3", "--json")
    assert old.exit_code == 0 and "--intruder-k is deprecated; use --top-k" in old.stderr, old.output
    assert json.loads(old.stdout)["intruders"]["k"] == 3  # the old value wins over --top-k's default


def test_tables_name_unet_blocks_json_keeps_both(tmp_path):
    """A UNet block's index is a position code (2010000): tables print its name, the JSON both."""
    import torch

    g = torch.Generator().manual_seed(0)
    stems = {"down_blocks_0_attentions_0": "unet.down_blocks.0.attentions.0.transformer_blocks.0",
             "mid_block_attentions_0": "unet.mid_block.attentions.0.transformer_blocks.0",
             "up_blocks_1_attentions_2": "unet.up_blocks.1.attentions.2.transformer_blocks.0"}
    t = {}
    for s in stems:
        stem = f"lora_unet_{s}_transformer_blocks_0_attn1_to_q"
        t[f"{stem}.lora_down.weight"] = torch.randn(4, 32, generator=g)
        t[f"{stem}.lora_up.weight"] = torch.randn(32, 4, generator=g)
    save_file(t, tmp_path / "unet_lora.safetensors")
    r = run("similarity", tmp_path / "unet_lora.safetensors")
    assert r.exit_code == 0, r.output
    for name in stems.values():
        assert name in r.stdout, r.stdout
    assert "2010200" not in r.stdout and "1000000" not in r.stdout
    grid = json.loads(run("similarity", tmp_path / "unet_lora.safetensors", "--json").stdout)["grids"][0]
    assert grid["blocks"] == [0, 1000000, 2010200] and grid["block_names"] == list(stems.values())
    layers = json.loads(run("spectrum", tmp_path / "unet_lora.safetensors", "--json").stdout)["layers"]
    assert {(x["block"], x["block_name"]) for x in layers} == set(zip(grid["blocks"], grid["block_names"]))


def test_k_and_top_k_together_is_refused(llama_adapter):
    """Both spellings of one setting: refused in one line (which value was meant is unknowable)."""
    line = assert_bad_input(run("similarity", llama_adapter[1], "--k", "2", "--top-k", "3"), "--k", "--top-k")
    assert "deprecated" not in line
