"""Rank reduction: the top singular values kept exactly, PEFT's energy rule, PEFT loads the result."""

import pytest
import torch

from lora_lens import ConfigError, load_adapter
from lora_lens.decompose import decompose_adapter
from lora_lens.methods import rank_for_energy, reduce_rank

from .peft_check import load_with_peft, token_ids


def test_rank_for_energy_is_peft_convention():
    S = torch.tensor([3.0, 2.0, 1.0])  # σ² = 9, 4, 1 of 14
    assert [rank_for_energy(S, e) for e in (0.5, 9 / 14, 0.65, 13 / 14, 0.95, 1.0)] == [1, 1, 2, 2, 3, 3]
    assert rank_for_energy(torch.zeros(4), 0.9) == 1
    peft_conv = pytest.importorskip("peft.tuners.lora.conversion")
    S = torch.rand(16, generator=torch.Generator().manual_seed(0)).sort(descending=True).values
    for e in (0.3, 0.5, 0.8, 0.9, 0.99):
        assert rank_for_energy(S, e) == peft_conv._find_cutoff_index(S, e)


def test_fixed_rank_keeps_top_singular_values(llama_adapter, tmp_path):
    pm, folder = llama_adapter
    res = reduce_rank(folder, rank=2, out_dir=tmp_path / "r2")
    before = decompose_adapter(load_adapter(folder), device="cpu", dtype="float64")
    red, src = load_adapter(tmp_path / "r2"), load_adapter(folder)
    after = decompose_adapter(red, device="cpu", dtype="float64")
    for name, sp in before.items():  # reduce is resize now: the scale is kept, S folded into the factors
        assert red[name].rank == 2 and red[name].scaling == pytest.approx(src[name].scaling, rel=1e-12)
        assert torch.allclose(after[name].S, sp.S[:2], rtol=1e-5)
        assert torch.allclose(after[name].U.abs(), sp.U[:, :2].abs(), atol=1e-4)
    rec = {r["module"]: r for r in res.records}
    assert rec["model.layers.1.self_attn.q_proj"]["rank_before"] == 2  # rank_pattern module stays at 2
    load_with_peft(pm.get_base_model(), tmp_path / "r2")


def test_energy_and_full_rank_reproduce_output(llama_adapter, tiny_llama, tmp_path):
    pm, folder = llama_adapter
    model, _ = tiny_llama
    res = reduce_rank(folder, energy=0.8, out_dir=tmp_path / "e")
    spectra = decompose_adapter(load_adapter(folder), device="cpu", dtype="float64")
    for r in res.records:
        assert r["rank_after"] == rank_for_energy(spectra[r["module"]].S, 0.8)
        assert r["energy_kept"] >= 0.8
    reduce_rank(folder, rank=64, out_dir=tmp_path / "full")  # above every rank: nothing dropped
    ids = token_ids(64)
    red = load_with_peft(model, tmp_path / "full")
    assert torch.allclose(red(ids).logits, pm(ids).logits, atol=1e-5)


def test_conv1d_and_modules_to_save(gpt2_adapter, bert_adapter, tmp_path):
    pm, folder = gpt2_adapter
    reduce_rank(folder, rank=4, out_dir=tmp_path / "g")
    red = load_with_peft(pm.get_base_model(), tmp_path / "g")
    ids = token_ids(64)
    assert torch.allclose(red(ids).logits, pm(ids).logits, atol=1e-5)
    bpm, bfolder = bert_adapter
    reduce_rank(bfolder, rank=8, out_dir=tmp_path / "b")
    ad = load_adapter(tmp_path / "b")
    assert ad.settings.modules_to_save == ("classifier",) and any("classifier" in o.name for o in ad.other_tensors)
    red = load_with_peft(bpm.get_base_model(), tmp_path / "b")
    ids = token_ids(64)
    assert torch.allclose(red(ids).logits, bpm(ids).logits, atol=1e-5)


def test_bad_options(llama_adapter, tmp_path):
    _, folder = llama_adapter
    with pytest.raises(ConfigError, match="exactly one"):
        reduce_rank(folder, rank=2, energy=0.5, out_dir=tmp_path / "x")
    with pytest.raises(ConfigError, match="fraction"):
        reduce_rank(folder, energy=1.5, out_dir=tmp_path / "x")
