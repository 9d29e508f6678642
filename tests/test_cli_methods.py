"""``lora-lens condlora|cora|pissa|reduce``: outputs, JSON and bad input (exit 2, one line, no traceback)."""

import json

import pytest

from lora_lens import load_adapter, load_adapters
from lora_lens.io import read_init_description

from .cli_utils import assert_bad_input, run


def test_condlora_init_then_analyze_json(tiny_llama, tmp_path):
    _, base = tiny_llama
    r = run("condlora", "init", "--base", base, "--rank", 2, "--targets", "q_proj", "--targets", "o_proj",
            "-o", tmp_path / "cl", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["init"]["method"] == "condlora" and d["summary"]["modules"] == 6
    r = run("condlora", "analyze", tmp_path / "cl" / "peft", "--base", base, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    g = d["grids"][0]
    assert len(d["grids"]) == 4 and g["side"] in "AB" and len(g["phi"]) == 3 and len(g["phi"][0]) == 3
    assert set(g["summary"]) >= {"phi_offdiag", "phi_offdiag_deep", "gaussian_offdiag", "structural_offdiag"}
    r = run("condlora", "analyze", tmp_path / "cl" / "peft", "--base", base)
    assert r.exit_code == 0 and "W0 C_A = A^T" in r.output


def test_condlora_output_is_labelled_by_its_folder_not_peft(tiny_llama, tmp_path):
    """The PEFT adapter inside a CondLoRA folder (OUT/peft) is OUT's: every output names OUT, never "peft"."""
    _, base = tiny_llama
    r = run("condlora", "init", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "cl-init")
    assert r.exit_code == 0, r.output
    for path in (tmp_path / "cl-init", tmp_path / "cl-init" / "peft"):
        assert load_adapter(path).label == "cl-init"
        r = run("spectrum", path)
        assert r.exit_code == 0 and r.stdout.startswith("Spectra of ΔW = s·B·A: cl-init ("), r.output
        d = json.loads(run("inspect", path, "--json").stdout)
        assert d["adapter_name"] == "cl-init", d["adapter_name"]
        r = run("condlora", "analyze", path, "--base", base)
        assert r.exit_code == 0 and "of cl-init (base" in r.stdout and "peft" not in r.stdout.splitlines()[0], r.output


def test_condlora_warm_start_from_cli(tiny_llama, llama_adapter, tmp_path):
    _, base = tiny_llama
    r = run("condlora", "init", "--base", base, "--from", llama_adapter[1], "--targets", "v_proj",
            "--mode", "general", "-o", tmp_path / "w")
    assert r.exit_code == 0, r.output
    assert "warm_start" in r.output and "residual_A" in r.output


def test_cora_basis_and_init(tiny_llama, tmp_path):
    _, base = tiny_llama
    r = run("cora", "basis", "--base", base, "--rank", 3, "--targets", "q_proj,v_proj", "-o", tmp_path / "b", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["rank"] == 3 and len(d["bases"]) == 6 and (tmp_path / "b" / "cora_basis.safetensors").is_file()
    assert not (tmp_path / "b" / "adapter_config.json").exists()
    r = run("cora", "init", "--base", base, "--rank", 3, "--targets", "q_proj", "--mode", "frozen",
            "--share-across-layers", "-o", tmp_path / "i")
    assert r.exit_code == 0, r.output
    assert read_init_description(tmp_path / "i").frozen == ["lora_B"]
    assert len(load_adapter(tmp_path / "i")) == 3


def test_pissa_and_reduce(tiny_llama, tmp_path):
    _, base = tiny_llama
    r = run("pissa", "--base", base, "--rank", 4, "--targets", "q_proj", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p" / "residual_model.safetensors").is_file()
    r = run("reduce", tmp_path / "p", "--rank", 2, "-o", tmp_path / "r", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert {rec["rank_after"] for rec in d["records"]} == {2}
    r = run("reduce", tmp_path / "p", "--energy", 0.5, "-o", tmp_path / "r")
    assert_bad_input(r, "not empty", "--overwrite")


@pytest.mark.parametrize("args,needles", [
    (["cora", "init", "--rank", 2, "--targets", "nope_proj"], ["unknown target", "nope_proj", "self_attn.q_proj"]),
    (["condlora", "init", "--rank", 2, "--targets", "k_proj", "--mode", "official"], ["square", "--mode general"]),
    (["cora", "basis", "--rank", 2, "--targets", "q_proj", "--source-kind", "deltas"], ["deltas", "--source"]),
    (["pissa", "--rank", 99, "--targets", "q_proj"], ["rank 99"]),
    (["condlora", "init", "--targets", "q_proj"], ["no rank"]),
])
def test_bad_input_one_line(tiny_llama, tmp_path, args, needles):
    _, base = tiny_llama
    assert_bad_input(run(*args, "--base", base, "-o", tmp_path / "out"), *needles)
    assert not (tmp_path / "out").exists()


def test_reduce_bad_options(llama_adapter, tmp_path):
    assert_bad_input(run("reduce", llama_adapter[1], "-o", tmp_path / "x"), "exactly one")
    assert_bad_input(run("reduce", llama_adapter[1], "--rank", 2, "--energy", 0.5, "-o", tmp_path / "x"), "exactly one")
    assert_bad_input(run("reduce", tmp_path / "missing", "--rank", 2, "-o", tmp_path / "x"), "no such file")


def test_missing_base_is_a_usage_error(tmp_path):
    for args in (["cora", "init", "--rank", 2, "--targets", "q_proj"], ["pissa", "--rank", 2, "--targets", "q"],
                 ["condlora", "analyze", tmp_path]):
        r = run(*args, "-o", tmp_path / "o") if args[0] != "condlora" else run(*args)
        assert r.exit_code == 2 and "Traceback" not in r.output
        assert "Missing option '--base'" in r.stderr


def test_help_has_examples():
    for cmd in (["condlora", "analyze"], ["condlora", "init"], ["cora", "basis"], ["cora", "init"], ["pissa"],
                ["reduce"]):
        r = run(*cmd, "--help")
        assert r.exit_code == 0 and "Examples:" in r.output, cmd


def test_condlora_adapter_still_selected_by_its_folder_name(tiny_llama, tmp_path):
    """``--adapter peft`` (the sub-folder's name, what selected it before it was named after OUT) and the
    weights file itself still reach OUT's adapter, labelled OUT."""
    _, base = tiny_llama
    r = run("condlora", "init", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "cl-init")
    assert r.exit_code == 0, r.output
    r = run("spectrum", tmp_path / "cl-init", "--adapter", "peft")
    assert r.exit_code == 0 and r.stdout.startswith("Spectra of ΔW = s·B·A: cl-init ("), r.output
    assert load_adapter(tmp_path / "cl-init", "peft").label == "cl-init"
    assert load_adapter(tmp_path / "cl-init" / "peft" / "adapter_model.safetensors").label == "cl-init"


def test_a_folder_of_adapters_includes_a_condlora_folder(tiny_llama, llama_adapter, tmp_path):
    """A folder of runs (the demo's adapters/: lora-seed0/, …, condlora/peft) lists the CondLoRA folder's
    adapter too, named after its folder: reading the folder skipped it."""
    import shutil

    _, base = tiny_llama
    shutil.copytree(llama_adapter[1], tmp_path / "runs" / "lora")
    r = run("condlora", "init", "--base", base, "--rank", 2, "--targets", "q_proj", "-o", tmp_path / "runs" / "cl")
    assert r.exit_code == 0, r.output
    assert [a.label for a in load_adapters(tmp_path / "runs")] == ["cl", "lora"]
    assert load_adapter(tmp_path / "runs", "cl").label == "cl"
