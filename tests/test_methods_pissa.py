"""PiSSA: same factors as PEFT's own pissa_init; residual base + adapter computes the original output."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_lens import load_adapter
from lora_lens.io import read_init_description
from lora_lens.methods import pissa_init

from .peft_check import load_with_peft, stories_model, token_ids  # noqa: F401


def _residual_model(model, folder):
    m = copy.deepcopy(model)
    res = m.load_state_dict(load_file(folder / "residual_model.safetensors"), strict=False)
    assert not res.unexpected_keys
    return m


@pytest.mark.realmodel
def test_stories_residual_plus_adapter_equals_original(stories_path, stories_model, tmp_path):
    out = tmp_path / "p"
    pissa_init(stories_path, 4, "q_proj,v_proj,down_proj", out_dir=out, alpha=8)
    assert read_init_description(out).method == "pissa"
    pm = load_with_peft(_residual_model(stories_model, out), out)
    ids = token_ids(512)
    assert torch.allclose(pm(ids).logits, stories_model(ids).logits, atol=1e-4)
    # the same factors as PEFT's own pissa_init (up to the sign of each singular pair), same residual
    peft = pytest.importorskip("peft")
    ref = peft.get_peft_model(copy.deepcopy(stories_model), peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights="pissa", target_modules=["q_proj", "v_proj", "down_proj"]))
    ours = load_adapter(out)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        layer = ref.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        assert torch.allclose(ours[name].A.abs(), A.abs(), atol=1e-5)
        assert torch.allclose(ours[name].B @ ours[name].A, B @ A, atol=1e-5)
        assert ours[name].scaling == layer.scaling["default"] == 2.0
        res = load_file(out / "residual_model.safetensors")[name + ".weight"]
        assert torch.allclose(res, layer.base_layer.weight.detach(), atol=1e-5)


def test_tiny_llama_residual_plus_adapter_equals_original(tiny_llama, tmp_path):
    model, folder = tiny_llama
    pissa_init(folder, 4, "q_proj,k_proj,up_proj", out_dir=tmp_path / "p", alpha=16)
    pm = load_with_peft(_residual_model(model, tmp_path / "p"), tmp_path / "p")
    ids = token_ids(64)
    assert torch.allclose(pm(ids).logits, model(ids).logits, atol=1e-5)


def test_gpt2_conv1d_and_randomized(tiny_gpt2, tmp_path):
    model, folder = tiny_gpt2
    ids = token_ids(64)
    for niter in (None, 4):
        out = tmp_path / f"p{niter}"
        pissa_init(folder, 4, "c_attn,c_fc", out_dir=out, niter=niter)
        res = load_file(out / "residual_model.safetensors")
        assert res["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # stored Conv1D layout kept
        assert set(res) == set(load_file(folder / "model.safetensors"))  # a complete base
        pm = load_with_peft(_residual_model(model, out), out)
        assert torch.allclose(pm(ids).logits, model(ids).logits, atol=1e-4)
