"""CoRA: orthonormal bases spanning the exact SVD subspace of the stacked weights; PEFT loads the init."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens import ConfigError, open_base
from lora_lens.io import read_init_description
from lora_lens.linalg import phi, svd
from lora_lens.methods import cora_basis, cora_init, target_layers, write_cora_basis

from .peft_check import load_with_peft, token_ids


def _exact_left(M: torch.Tensor, r: int) -> torch.Tensor:
    return svd(M.double())[0][:, :r]


@pytest.mark.realmodel
def test_minilm_bases_orthonormal_and_span_exact_subspace(minilm_path):
    base = open_base(minilm_path)
    basis = cora_basis(base, 8, "query,key,value", device="cpu")
    layers = target_layers(base, "query,key,value")
    assert set(layers) == {"attention.self.query", "attention.self.key", "attention.self.value"}
    for mt, ls in layers.items():
        for x in ls:
            B = basis.basis_for(mt, x)
            assert B.shape == (384, 8)
            assert torch.allclose(B.T.double() @ B.double(), torch.eye(8, dtype=torch.float64), atol=1e-5)
            assert phi(_exact_left(base.get(x.weight), 8), B.double()) >= 0.999
            assert 0 < basis.energy[x.module] < 1


@pytest.mark.realmodel
def test_minilm_shared_and_multi_source(minilm_path, tmp_path):
    base = open_base(minilm_path)
    ls = target_layers(base, "value")["attention.self.value"]
    Ws = [base.get(x.weight).double() for x in ls]
    shared = cora_basis(base, 8, "value", share_across_layers=True, device="cpu")
    B = shared.bases["attention.self.value"]
    assert B.shape == (384, 8) and len(shared.bases) == 1
    assert phi(_exact_left(torch.cat(Ws, 1), 8), B.double()) >= 0.999
    # a "fine-tune": the value weights plus a structured change, as a second checkpoint with only those tensors
    gen = torch.Generator().manual_seed(0)
    ft = {x.weight: (base.get(x.weight) + 0.05 * torch.randn(384, 4, generator=gen) @ torch.randn(4, 384, generator=gen))
          for x in ls}
    save_file(ft, tmp_path / "ft.safetensors")
    two = cora_basis(base, 8, "value", [tmp_path / "ft.safetensors"], device="cpu")
    deltas = cora_basis(base, 4, "value", [tmp_path / "ft.safetensors"], source_kind="deltas", device="cpu")
    for x, W in zip(ls, Ws):
        Wft = ft[x.weight].double()
        assert phi(_exact_left(torch.cat([W, Wft], 1), 8), two.basis_for("attention.self.value", x).double()) >= 0.999
        assert phi(_exact_left(Wft - W, 4), deltas.basis_for("attention.self.value", x).double()) >= 0.999
    with pytest.raises(ConfigError, match="deltas"):
        cora_basis(base, 4, "value", source_kind="deltas")


def test_init_frozen_and_init_modes_load_in_peft(tiny_llama, tmp_path):
    model, folder = tiny_llama
    cora_init(folder, 4, "q_proj,k_proj,v_proj", out_dir=tmp_path / "frozen", mode="frozen", device="cpu")
    desc = read_init_description(tmp_path / "frozen")
    assert desc.method == "cora" and desc.mode == "frozen" and desc.frozen == ["lora_B"] and desc.peft_adapter == "."
    cora_init(folder, 4, "q_proj", out_dir=tmp_path / "init", mode="init", scale="kaiming", share_across_layers=True)
    assert read_init_description(tmp_path / "init").frozen == []
    ids = token_ids(64)
    for sub in ("frozen", "init"):
        pm = load_with_peft(model, tmp_path / sub)
        assert torch.equal(pm(ids).logits, model(ids).logits)
    w = load_file(tmp_path / "init" / "adapter_model.safetensors")
    B0 = w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    B2 = w["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"]
    assert torch.equal(B0, B2)  # one basis shared by every layer
    assert torch.allclose(B0.norm(), torch.tensor((32 / 3) ** 0.5), rtol=1e-5)  # ‖B‖_F of Kaiming-uniform B
    assert w["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].abs().sum() == 0


def test_gpt2_conv1d_basis_in_pytorch_layout(tiny_gpt2, tmp_path):
    model, folder = tiny_gpt2
    res = cora_init(folder, 4, "c_attn", out_dir=tmp_path / "g")
    assert res.description.targets == ["attn.c_attn"]
    pm = load_with_peft(model, tmp_path / "g")
    ids = token_ids(64)
    assert torch.equal(pm(ids).logits, model(ids).logits)
    w = load_file(tmp_path / "g" / "adapter_model.safetensors")
    B = w["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert B.shape == (96, 4)  # (m, r): Conv1D stores c_attn as (n=32, m=96)
    W = model.transformer.h[1].attn.c_attn.weight.detach().T  # (m, n)
    assert phi(_exact_left(W, 4), B.double()) >= 0.999
    assert json.loads((tmp_path / "g" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_write_basis_files(tiny_llama, tmp_path):
    _, folder = tiny_llama
    basis = cora_basis(folder, 3, "v_proj")
    write_cora_basis(basis, tmp_path / "b")
    t = load_file(tmp_path / "b" / "cora_basis.safetensors")
    assert t["model.layers.1.self_attn.v_proj.basis"].shape == (16, 3)
    assert t["model.layers.1.self_attn.v_proj.singular_values"].shape == (3,)
    d = json.loads((tmp_path / "b" / "cora_basis.json").read_text())
    assert d["rank"] == 3 and len(d["bases"]) == 3 and d["params"]["source_kind"] == "weights"
    with pytest.raises(ConfigError, match="rank 17"):
        cora_basis(folder, 17, "v_proj")


@pytest.mark.realmodel
def test_stories_init_loads_in_peft(stories_path, stories_model, tmp_path):
    cora_init(stories_path, 4, "q_proj,k_proj,v_proj", out_dir=tmp_path / "c", mode="frozen")
    pm = load_with_peft(stories_model, tmp_path / "c")
    ids = token_ids(512)
    assert torch.equal(pm(ids).logits, stories_model(ids).logits)
