"""``lora-lens inspect`` and every kind of bad input: exit 2, one line, no traceback."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from .cli_utils import assert_bad_input, run




def test_inspect_adapter_json(llama_adapter):
    _, folder = llama_adapter
    r = run("inspect", folder, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "adapter"
    recs = {m["name"]: m for m in d["modules"]}
    assert recs["model.layers.1.self_attn.q_proj"]["rank"] == 2
    assert recs["model.layers.0.self_attn.q_proj"]["scaling"] == 2.0
    assert recs["model.layers.0.self_attn.q_proj"]["block"] == 0
    assert d["totals"]["parameters"] == sum(m["parameters"] for m in d["modules"])


def test_inspect_adapter_table_and_base_table(gpt2_adapter, stories_path):
    r = run("inspect", gpt2_adapter[1])
    assert r.exit_code == 0 and "conv1d" in r.output and "transformer.h.1.attn.c_attn" in r.output
    r = run("inspect", stories_path)
    assert r.exit_code == 0 and "self_attn.q_proj" in r.output and "260,032" in r.output


def test_missing_path(tmp_path):
    assert_bad_input(run("inspect", tmp_path / "nope"), "nope", "no such file")


def test_empty_folder(tmp_path):
    assert_bad_input(run("inspect", tmp_path), "is empty")


def test_plain_file_where_folder_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    assert_bad_input(run("inspect", tmp_path / "notes.txt"), "notes.txt", "unknown file type")


def test_invalid_json_config(adapter_copy):
    (adapter_copy / "adapter_config.json").write_text("{ not json")
    assert_bad_input(run("inspect", adapter_copy), "adapter_config.json", "invalid JSON")


def test_missing_weights_file(adapter_copy):
    os.remove(adapter_copy / "adapter_model.safetensors")
    assert_bad_input(run("inspect", adapter_copy), "no weights file")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_safetensors(adapter_copy, damage):
    f = adapter_copy / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 50)
    before = f.read_bytes()
    assert_bad_input(run("inspect", adapter_copy), "adapter_model.safetensors", "not a valid safetensors")
    assert f.read_bytes() == before  # inputs never modified


def _rewrite(folder, edit):
    from safetensors.torch import load_file

    f = folder / "adapter_model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def test_rank_mismatch_between_A_and_B(adapter_copy):
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    _rewrite(adapter_copy, lambda sd: sd.__setitem__(key, torch.randn(sd[key].shape[0], 3)))
    assert_bad_input(run("inspect", adapter_copy), "model.layers.0.self_attn.v_proj", "same r")


def test_lora_A_without_lora_B(adapter_copy):
    _rewrite(adapter_copy, lambda sd: sd.pop("base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"))
    assert_bad_input(run("inspect", adapter_copy), "model.layers.2.self_attn.q_proj", "no lora_B")


def test_wrong_rank_in_config(adapter_copy):
    cfg = json.loads((adapter_copy / "adapter_config.json").read_text())
    cfg["r"] = 16
    (adapter_copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert_bad_input(run("inspect", adapter_copy), "config r=16", "tensors r=4")


def test_integer_tensor(adapter_copy):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite(adapter_copy, lambda sd: sd.__setitem__(key, torch.ones_like(sd[key], dtype=torch.int32)))
    assert_bad_input(run("inspect", adapter_copy), key, "integer dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_named(adapter_copy, bad):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def edit(sd):
        sd[key] = sd[key].clone()
        sd[key][0, 0] = bad

    _rewrite(adapter_copy, edit)
    assert_bad_input(run("inspect", adapter_copy), key, "NaN/Inf")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora_lens_pwned_should_not_exist",))


def test_pickle_exploit_bin_refused_and_never_run(tmp_path):
    marker = "/tmp/lora_lens_pwned_should_not_exist"
    if os.path.exists(marker):
        os.remove(marker)
    torch.save({"w": torch.zeros(2, 2), "evil": _Exploit()}, tmp_path / "pytorch_model.bin")
    assert_bad_input(run("inspect", tmp_path), "pytorch_model.bin", "refused")
    assert not os.path.exists(marker)
    # the same as an adapter weights file
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "peft_type": "LORA"}))
    with open(tmp_path / "ad" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    assert_bad_input(run("inspect", tmp_path / "ad"), "adapter_model.bin")
    assert not os.path.exists(marker)


def test_internal_error_exits_1_without_traceback(monkeypatch, llama_adapter):
    import lora_lens

    def boom(path):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(lora_lens, "inspect_path", boom)  # the command imports it from lora_lens when it runs
    r = run("inspect", llama_adapter[1])
    assert r.exit_code == 1 and "internal error" in r.stderr and "Traceback" not in r.output


def test_help_has_example():
    r = run("inspect", "--help")
    assert r.exit_code == 0 and "Examples" in r.output
