"""Subspace similarity against a direct float64 implementation, scipy, invariants and random baselines."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

from lora_lens import ConfigError, ShapeError, load_adapter, open_base
from lora_lens.compare import (
    adapter_similarity, expected_phi_grid, layer_baseline, layer_similarity, pair_baseline, pairwise_similarity,
)
from lora_lens.compare.subspaces import cross_phi, padded
from lora_lens.types import Adapter, LoraModule, LoraSettings
from lora_lens.keys import parse_module_path

from .adapter_utils import make_peft_adapter


# ---------------------------------------------------------------- references (float64, numpy)

def ref_basis(module: LoraModule, what: str, W0: np.ndarray | None = None, k: int | None = None) -> np.ndarray:
    """Orthonormal basis by a plain numpy SVD of the materialized object."""
    if what == "delta":
        U = np.linalg.svd(module.delta(torch.float64).numpy())[0]
        k = k or module.rank
    elif what == "B":
        U = np.linalg.svd(module.B.double().numpy())[0]
        k = k or module.rank
    elif what == "A":
        U = np.linalg.svd(module.A.double().numpy())[2].T
        k = k or module.rank
    else:
        U = np.linalg.svd(W0)[0]
        k = k or module.rank
    return U[:, :k]


def ref_phi(X: np.ndarray, Y: np.ndarray, i: int | None = None, j: int | None = None) -> float:
    i, j = i or X.shape[1], j or Y.shape[1]
    return float(np.sum((X[:, :i].T @ Y[:, :j]) ** 2) / min(i, j))


def synthetic_adapter(shapes: dict[str, tuple[int, int, int]], seed: int, path: str = "synthetic") -> Adapter:
    """An adapter of Gaussian factors: ``{module path: (m, n, r)}``."""
    gen = torch.Generator().manual_seed(seed)
    mods = [LoraModule(name, parse_module_path(name), torch.randn(r, n, generator=gen),
                       torch.randn(m, r, generator=gen), alpha=float(r), scaling=1.0)
            for name, (m, n, r) in shapes.items()]
    return Adapter(Path(path), LoraSettings(r=max(s[2] for s in shapes.values()), lora_alpha=1.0), tuple(mods))


# ---------------------------------------------------------------- kernel

def test_cross_phi_padded_equals_direct():
    gen = torch.Generator().manual_seed(0)
    ks = [3, 1, 4]
    bases = [torch.linalg.qr(torch.randn(10, k, generator=gen, dtype=torch.float64))[0] for k in ks]
    grid = cross_phi(padded(bases), ks)
    for a in range(3):
        for b in range(3):
            assert grid[a, b].item() == pytest.approx(ref_phi(bases[a].numpy(), bases[b].numpy()), abs=1e-12)


# ---------------------------------------------------------------- layers × layers

@pytest.mark.parametrize("what", ["delta", "A", "B"])
def test_layer_grid_matches_direct_float64(llama_adapter, what):
    adapter = load_adapter(llama_adapter[1])
    res = layer_similarity(adapter, what=what, device="cpu", dtype="float64")
    assert [g.module_type for g in res.grids] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    for g in res.grids:
        assert g.blocks == (0, 1, 2)
        refs = [ref_basis(adapter[n], what) for n in g.names]
        want = np.array([[ref_phi(x, y) for y in refs] for x in refs])
        assert np.allclose(g.phi.numpy(), want, atol=1e-10)
        assert torch.allclose(g.phi, g.phi.T)
        assert torch.allclose(torch.diagonal(g.phi), torch.ones(3, dtype=torch.float64))
        assert g.dim == refs[0].shape[0]
    q = res.grids[1]
    assert q.ks == (4, 2, 4)  # rank_pattern: layer 1 has r=2, φ[0, 1] divides by min(4, 2)


def test_layer_grid_k_truncates_and_float32_close(llama_adapter):
    adapter = load_adapter(llama_adapter[1])
    res = layer_similarity(adapter, what="delta", k=2, device="cpu")
    g = res.grids[0]
    refs = [ref_basis(adapter[n], "delta", k=2) for n in g.names]
    want = np.array([[ref_phi(x, y) for y in refs] for x in refs])
    assert g.ks == (2, 2, 2) and np.allclose(g.phi.numpy(), want, atol=1e-5)


def test_layer_grid_of_base_weights_matches_direct(tiny_llama, llama_adapter):
    adapter = load_adapter(llama_adapter[1])
    sd = load_file(Path(tiny_llama[1]) / "model.safetensors")
    res = layer_similarity(adapter, what="base", base=open_base(tiny_llama[1]), k=3, dtype="float64")
    for g in res.grids:
        refs = [ref_basis(adapter[n], "base", sd[n + ".weight"].double().numpy(), k=3) for n in g.names]
        want = np.array([[ref_phi(x, y) for y in refs] for x in refs])
        assert np.allclose(g.phi.numpy(), want, atol=1e-8)


def test_base_grid_bridges_bert_prefix_and_transposes_conv1d(bert_adapter, tiny_bert, gpt2_adapter, tiny_gpt2):
    adapter = load_adapter(bert_adapter[1])
    assert adapter.names[0].startswith("bert.encoder")
    res = layer_similarity(adapter, what="base", base=open_base(tiny_bert[1]), dtype="float64")
    sd = load_file(Path(tiny_bert[1]) / "model.safetensors")  # plain BertModel: no "bert." prefix
    g = res.grids[0]
    refs = [ref_basis(adapter[n], "base", sd[n.removeprefix("bert.") + ".weight"].double().numpy()) for n in g.names]
    assert np.allclose(g.phi.numpy(), [[ref_phi(x, y) for y in refs] for x in refs], atol=1e-8)
    # GPT-2 Conv1D stores W0 as (n, m): the base grid must use W0ᵀ's left vectors (dim m).
    gadapter = load_adapter(gpt2_adapter[1])
    sd = load_file(Path(tiny_gpt2[1]) / "model.safetensors")
    res = layer_similarity(gadapter, what="base", base=open_base(tiny_gpt2[1]), dtype="float64")
    g = next(g for g in res.grids if g.module_type == "attn.c_attn")
    assert g.dim == 96
    refs = [ref_basis(gadapter[n], "base", sd[n + ".weight"].double().numpy().T) for n in g.names]
    assert np.allclose(g.phi.numpy(), [[ref_phi(x, y) for y in refs] for x in refs], atol=1e-8)


def test_layer_baseline_and_summary_json(llama_adapter):
    res = layer_similarity(load_adapter(llama_adapter[1]), device="cpu")
    g = res.grids[0]
    s = g.summary()
    off = g.phi[~torch.eye(3, dtype=torch.bool)]
    assert s["mean_offdiag"] == pytest.approx(float(off.mean()))
    assert s["deep_mean_offdiag"] == pytest.approx(float(g.phi[1, 2]))  # layers 1, 2 are the deeper half
    assert s["expected_mean_offdiag"] == pytest.approx(4 / 32)
    assert torch.allclose(g.expected_phi, torch.full((3, 3), 4 / 32, dtype=torch.float64))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["grids"][0]["phi"][0][0] == pytest.approx(1.0) and d["grids"][0]["blocks"] == [0, 1, 2]
    assert d["what"] == "delta" and d["side"] == "out"


def test_sampled_baseline_converges_to_expectation():
    sampled, expected = layer_baseline(40, [2, 6, 6], draws=400, seed=3)
    assert torch.allclose(sampled, expected, atol=0.01)
    assert expected[0, 1] == pytest.approx(6 / 40)
    b = pair_baseline(40, 3, 8, draws=400)
    assert torch.allclose(b.grid, expected_phi_grid(3, 8, 40), atol=0.01)
    assert b.expected_phi == pytest.approx(3 / 40) and b.expected_phi_full == pytest.approx(8 / 40)


def test_single_layer_grid_has_no_off_diagonal():
    ad = synthetic_adapter({"lm_head": (12, 8, 2)}, seed=0)
    res = layer_similarity(ad, device="cpu")
    g = res.grids[0]
    assert g.blocks == (None,) and g.summary()["mean_offdiag"] is None
    json.dumps(res.to_dict(), allow_nan=False)


# ---------------------------------------------------------------- adapter × adapter

def test_adapter_vs_itself_is_one(llama_adapter):
    adapter = load_adapter(llama_adapter[1])
    res = adapter_similarity(adapter, adapter, device="cpu", dtype="float64")
    assert len(res.modules) == 9 and not res.unmatched_a and not res.unmatched_b
    for m in res.modules:
        assert m.phi == pytest.approx(1.0) and m.phi_full == pytest.approx(1.0)
        assert torch.allclose(m.grid, torch.ones_like(m.grid))
        assert m.angles_deg.abs().max() < 1e-5 and m.grassmann < 1e-6
        assert m.baseline.phi < 0.5


def test_two_seeds_match_direct_and_scipy_angles(tiny_llama, llama_adapter, tmp_path):
    a = load_adapter(llama_adapter[1])
    make_peft_adapter(tiny_llama[0], tmp_path, seed=7, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj", "down_proj"],
                      rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"down_proj": 3.0})
    b = load_adapter(tmp_path)
    for what in ("delta", "A"):
        res = adapter_similarity(a, b, what=what, dtype="float64")
        for m in res.modules:
            X, Y = ref_basis(a[m.name], what), ref_basis(b[m.name], what)
            grid = np.array([[ref_phi(X, Y, i, j) for j in range(1, Y.shape[1] + 1)] for i in range(1, X.shape[1] + 1)])
            assert np.allclose(m.grid.numpy(), grid, atol=1e-10)
            assert m.phi == pytest.approx(grid[-1, -1], abs=1e-10)
            ang = np.sort(np.rad2deg(scipy.linalg.subspace_angles(X, Y)))
            assert np.allclose(m.angles_deg.numpy(), ang, atol=1e-8)
            assert m.grassmann == pytest.approx(np.linalg.norm(np.deg2rad(ang)), abs=1e-10)
            assert m.phi_full == pytest.approx(np.mean(np.cos(np.deg2rad(ang)) ** 2), abs=1e-10)


def test_independent_random_adapters_sit_at_the_baseline():
    shapes = {f"model.layers.{i}.self_attn.{t}": (256, 256, 8) for i in range(4) for t in ("q_proj", "v_proj")}
    a, b = synthetic_adapter(shapes, seed=1, path="a"), synthetic_adapter(shapes, seed=2, path="b")
    s = adapter_similarity(a, b, device="cpu").summary()
    assert s["expected_phi"] == pytest.approx(8 / 256)
    assert abs(s["phi"] - s["expected_phi"]) < 0.01 and abs(s["random_phi"] - s["expected_phi"]) < 0.01
    assert s["grassmann"] == pytest.approx(s["random_grassmann"], rel=0.05)
    # and the layer grid of one of them too
    g = layer_similarity(a, device="cpu").grids[0].summary()
    assert abs(g["mean_offdiag"] - g["expected_mean_offdiag"]) < 0.01


def test_ranks_differ_r2_vs_r8_and_containment():
    """The LoRA §7.2 setting: A_{r=small} against A_{r=large}; a contained subspace gives φ = 1."""
    gen = torch.Generator().manual_seed(0)
    A8 = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    name = "model.layers.0.self_attn.q_proj"
    key = parse_module_path(name)
    B8, B2 = torch.randn(2, 32, 8, generator=gen, dtype=torch.float64)
    big = Adapter(Path("r8"), LoraSettings(8, 8.0), (LoraModule(name, key, A8, B8, 8.0, 1.0),))
    A2 = A8[:2] * 3  # rows inside A8's row space
    small = Adapter(Path("r2"), LoraSettings(2, 2.0), (LoraModule(name, key, A2, B2[:, :2], 2.0, 1.0),))
    m = adapter_similarity(small, big, what="A", dtype="float64").modules[0]
    assert (m.k_a, m.k_b) == (2, 8) and m.grid.shape == (2, 8)
    assert m.phi_full == pytest.approx(1.0)  # span(A2) ⊂ span(A8)
    assert m.angles_deg.shape == (2,) and m.angles_deg.max() < 1e-5
    assert m.baseline.expected_grid.shape == (2, 8) and m.baseline.expected_phi_full == pytest.approx(8 / 64)


def test_unmatched_modules_reported_and_shape_mismatch_refused():
    a = synthetic_adapter({"layers.0.q": (16, 16, 2), "layers.0.v": (16, 16, 2)}, seed=0)
    b = synthetic_adapter({"layers.0.q": (16, 16, 2), "layers.0.o": (16, 16, 2)}, seed=1)
    res = adapter_similarity(a, b)
    assert [m.name for m in res.modules] == ["layers.0.q"]
    assert res.unmatched_a == ("layers.0.v",) and res.unmatched_b == ("layers.0.o",)
    c = synthetic_adapter({"layers.0.q": (24, 16, 2)}, seed=2)
    with pytest.raises(ShapeError, match="layers.0.q"):
        adapter_similarity(a, c)


def test_pairwise_and_bad_options(llama_adapter):
    a = load_adapter(llama_adapter[1])
    pairs = pairwise_similarity([a, a, a])
    assert len(pairs) == 3
    with pytest.raises(ConfigError, match="base"):
        adapter_similarity(a, a, what="base")
    with pytest.raises(ConfigError, match="--base"):
        layer_similarity(a, what="base")
    with pytest.raises(ConfigError, match="side"):
        layer_similarity(a, what="A", side="left")
    with pytest.raises(ConfigError, match="unknown subspace"):
        layer_similarity(a, what="C")
    d = json.loads(json.dumps(pairs[0].to_dict(), allow_nan=False))
    assert len(d["modules"]) == 9 and "grid" in d["modules"][0] and "grid" in d["modules"][0]["expected"]
    assert not math.isnan(d["summary"]["phi"])


def test_untrained_adapter_is_flagged(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    import copy
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama[0]), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)  # PEFT's default init: B = 0, so ΔW = 0
    ad = load_adapter(tmp_path)
    assert "untrained" in layer_similarity(ad).notes[-1]
    assert layer_similarity(ad, what="A").notes == ()  # A is random, not zero
    assert "untrained" in adapter_similarity(ad, ad).notes[0]
