"""PiSSA: same factors as PEFT's own pissa_init; residual base + adapter computes the original output."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_lens import load_adapter
from lora_lens.io import read_init_description
from lora_lens.methods import pissa_init

from .peft_check import load_with_peft, token_ids
from .tolerances import gamma, logits_atol_float64


def _residual_model(model, folder):
    m = copy.deepcopy(model)
    res = m.load_state_dict(load_file(folder / "residual_model.safetensors"), strict=False)
    assert not res.unexpected_keys
    return m


@torch.no_grad()
def assert_same_logits(pm, model, folder, ids):
    """Residual base + PEFT adapter computes the original model, in two checks that are each exact:

    1. weights: the stored residual ``fl(W0 − s·BA)`` plus ``s·BA`` is W0 up to one float32 evaluation of that
       expression, ``|δW| ≤ γ_{r+2}(|W0| + s|B||A|)`` elementwise (tests/tolerances.py);
    2. logits: PEFT's model equals the original model with those rebuilt weights, compared in float64 where
       the order of operations does not matter (≈ 1e-12): PEFT applies the files as the maths says.
    """
    residual = load_file(folder / "residual_model.safetensors")
    rebuilt_model = copy.deepcopy(model).double()
    weights = dict(rebuilt_model.named_parameters())
    for mod in load_adapter(folder):
        W0 = weights[mod.name + ".weight"]
        rebuilt = residual[mod.name + ".weight"].double() + mod.delta(torch.float64, base_layout=True)
        B, A = mod.B.double().abs(), mod.A.double().abs()
        magnitude = B @ A if mod.layout == "linear" else (B @ A).T
        bound = gamma(mod.rank + 2) * (W0.abs() + abs(mod.scaling) * magnitude)
        assert ((rebuilt - W0).abs() <= bound).all(), mod.name
        W0.copy_(rebuilt)
    ref = rebuilt_model(ids).logits
    cfg = model.config
    atol = logits_atol_float64(ref, depth=6 * cfg.num_hidden_layers + 1, width=4 * cfg.hidden_size)
    torch.testing.assert_close(copy.deepcopy(pm).double()(ids).logits, ref, atol=atol, rtol=0)


@pytest.mark.realmodel
def test_stories_residual_plus_adapter_equals_original(stories_path, stories_model, tmp_path):
    out = tmp_path / "p"
    pissa_init(stories_path, 4, "q_proj,v_proj,down_proj", out_dir=out, alpha=8)
    assert read_init_description(out).method == "pissa"
    pm = load_with_peft(_residual_model(stories_model, out), out)
    ids = token_ids(512)
    assert_same_logits(pm, stories_model, out, ids)
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
    assert_same_logits(pm, model, tmp_path / "p", ids)


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
        assert_same_logits(pm, model, out, ids)
