"""CondLoRA: conversion-matrix analysis against a float64 NumPy reference, Θ init files, warm start."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_lens import ConfigError, ShapeError, load_adapter, open_base, save_peft_adapter
from lora_lens.compute import item_seed
from lora_lens.io import read_init_description
from lora_lens.methods import condlora_analysis, condlora_factors, condlora_init, target_layers
from lora_lens.methods.targets import lora_module

from .peft_check import load_with_peft, token_ids

R = 4


def _random_adapter(base_path, targets, folder, rank=R, alpha=8.0, seed=0):
    """A PEFT adapter with random non-zero A and B on the targets of a real base."""
    base = open_base(base_path)
    gen = torch.Generator().manual_seed(seed)
    mods = []
    for ls in target_layers(base, targets).values():
        for x in ls:
            m, n = x.shape
            mods.append(lora_module(x, torch.randn(rank, n, generator=gen) / n ** 0.5,
                                    torch.randn(m, rank, generator=gen) / rank ** 0.5, alpha))
    save_peft_adapter(folder, mods)
    return load_adapter(folder)


def _reference(adapter, base, module_type):
    """Float64 NumPy: per layer C_A, C_B (exact solve if square, min-norm lstsq otherwise), φ grids, residuals."""
    mods = sorted((m for m in adapter if m.key.module == module_type), key=lambda m: m.key.block)
    names = base.weight_names_for([m.name for m in mods])
    out = {"A": [], "B": []}
    res = {"A": [], "B": []}
    for m in mods:
        W = base.get(names[m.name]).double().numpy()
        A, B = m.A.double().numpy(), m.B.double().numpy()
        if W.shape[0] == W.shape[1]:
            CA, CB = np.linalg.solve(W, A.T), np.linalg.solve(W, B)  # the paper's W0⁻¹
            SA = W
        else:
            CA = np.linalg.lstsq(W.T, A.T, rcond=None)[0]
            CB = np.linalg.lstsq(W, B, rcond=None)[0]
            SA = W.T
        for s, C, S, F in (("A", CA, SA, A.T), ("B", CB, W, B)):
            out[s].append(np.linalg.svd(C, full_matrices=False)[0][:, : m.rank])
            res[s].append(np.linalg.norm(S @ C - F) / np.linalg.norm(F))
    grids = {s: np.array([[np.sum((Ua.T @ Ub) ** 2) / R for Ub in out[s]] for Ua in out[s]]) for s in out}
    return grids, {s: np.array(v) for s, v in res.items()}


@pytest.mark.realmodel
@pytest.mark.parametrize("module_type", ["self_attn.q_proj", "self_attn.k_proj"])
def test_analysis_matches_float64_reference_on_stories(stories_path, tmp_path, module_type):
    ad = _random_adapter(stories_path, "q_proj,k_proj", tmp_path / "ad")
    base = open_base(stories_path)
    ref, ref_res = _reference(ad, base, module_type)
    an64 = condlora_analysis(ad, base, device="cpu", dtype="float64")
    an32 = condlora_analysis(ad, base, device="cpu")
    for s in "AB":
        g = an64.grid(module_type, s)
        assert g.phi.shape == (5, 5) and g.blocks == (0, 1, 2, 3, 4)
        np.testing.assert_allclose(g.phi.numpy(), ref[s], atol=1e-9)
        np.testing.assert_allclose(an32.grid(module_type, s).phi.numpy(), ref[s], atol=2e-4)
        np.testing.assert_allclose(g.residual.numpy(), ref_res[s], atol=1e-9)
        assert torch.allclose(torch.diagonal(g.gaussian), torch.ones(5, dtype=torch.float64))
    if module_type == "self_attn.k_proj":  # 32×64: A side overdetermined (residual > 0), B side min-norm exact
        assert an64.grid(module_type, "A").equation == "W0^T C_A = A^T"
        assert an64.grid(module_type, "A").residual.min() > 0.1
        assert an64.grid(module_type, "B").residual.max() < 1e-10
    else:
        assert an64.grid(module_type, "A").equation == "W0 C_A = A^T"


@pytest.mark.realmodel
def test_analysis_on_minilm_shows_structure_baseline(minilm_path, tmp_path):
    """Square 384×384: matches the reference; W0⁻¹G is more similar across layers than Gaussian (docs/maths.md §5)."""
    ad = _random_adapter(minilm_path, "query,value", tmp_path / "ad", rank=8)
    base = open_base(minilm_path)
    an = condlora_analysis(ad, base, device="cpu", dtype="float64", seed=3)
    ref, _ = _reference(ad, base, "attention.self.value")
    ref = {s: ref[s] * R / 8 for s in ref}  # the helper divides by R
    np.testing.assert_allclose(an.grid("attention.self.value", "B").phi.numpy(), ref["B"], atol=1e-9)
    s = an.grid("attention.self.value", "B").summary()
    assert abs(s["gaussian_offdiag"] - 8 / 384) < 0.01
    assert s["structural_offdiag"] > s["gaussian_offdiag"]
    d = an.to_dict()
    assert {(g["module_type"], g["side"]) for g in d["grids"]} == {
        (t, s) for t in ("attention.self.query", "attention.self.value") for s in "AB"}
    assert len(d["grids"][0]["phi"]) == 6 and len(d["grids"][0]["phi"][0]) == 6
    json.dumps(d)  # JSON-ready
    again = condlora_analysis(ad, base, device="cpu", dtype="float64", seed=3)
    assert torch.equal(again.grids[0].structural, an.grids[0].structural)  # deterministic


def test_factors_official_and_general():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(3, 6, 6, generator=gen, dtype=torch.float64)
    tA, tB = torch.randn(2, 6, generator=gen, dtype=torch.float64), torch.randn(2, 6, generator=gen, dtype=torch.float64)
    A, B = condlora_factors(tA, tB, W, "official")
    assert torch.allclose(A[1], tA @ W[1].T) and torch.allclose(B[2], W[2] @ tB.T)
    Wr = torch.randn(5, 7, generator=gen, dtype=torch.float64)  # (m, n)
    gA, gB = torch.randn(5, 2, generator=gen, dtype=torch.float64), torch.randn(7, 2, generator=gen, dtype=torch.float64)
    A, B = condlora_factors(gA, gB, Wr, "general")
    assert A.shape == (2, 7) and B.shape == (5, 2)
    assert torch.allclose(A, gA.T @ Wr) and torch.allclose(B, Wr @ gB)
    with pytest.raises(ShapeError, match="square"):
        condlora_factors(tA, tB, Wr, "official")
    with pytest.raises(ShapeError):
        condlora_factors(gB, gA, Wr, "general")


def test_default_init_is_kaiming_and_preserves_output(tiny_llama, tmp_path):
    model, folder = tiny_llama
    res = condlora_init(folder, 4, ["q_proj", "o_proj"], out_dir=tmp_path / "cl", seed=1)
    theta = load_file(tmp_path / "cl" / "condlora_theta.safetensors")
    tA = theta["self_attn.q_proj.theta_A"]
    assert tA.shape == (4, 32) and theta["self_attn.q_proj.theta_B"].abs().sum() == 0
    assert tA.abs().max() <= 1 / math.sqrt(32)  # kaiming_uniform_(a=√5) bound = 1/√fan_in
    ref = torch.empty(4, 32)
    mt = res.description.targets[0]
    # each module type draws from its own generator, seeded by its name (so adding a target changes no other Θ)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(item_seed(1, mt)))
    assert torch.equal(theta[f"{mt}.theta_A"], ref)
    desc = read_init_description(tmp_path / "cl")
    assert desc.method == "condlora" and desc.mode == "official" and desc.peft_adapter == "peft"
    assert desc.theta_file == "condlora_theta.safetensors" and set(desc.targets) == {"self_attn.q_proj", "self_attn.o_proj"}
    pm = load_with_peft(model, tmp_path / "cl" / "peft")
    ids = token_ids(64)
    assert torch.equal(pm(ids).logits, model(ids).logits)
    # the PEFT factors are what Θ gives
    ad = load_adapter(tmp_path / "cl" / "peft")
    W0 = model.model.layers[2].self_attn.q_proj.weight.detach()
    A, _ = condlora_factors(tA, theta["self_attn.q_proj.theta_B"], W0)
    assert torch.allclose(ad["model.layers.2.self_attn.q_proj"].A, A, atol=1e-6)


def test_general_mode_fan_in_and_non_square_refused_in_official(tiny_llama, tmp_path):
    _, folder = tiny_llama
    with pytest.raises(ConfigError, match="--mode general"):
        condlora_init(folder, 4, "k_proj", out_dir=tmp_path / "x", mode="official")
    auto = condlora_init(folder, 4, "k_proj", out_dir=tmp_path / "auto")  # auto: general for a non-square W0
    assert auto.description.mode == "general"
    res = condlora_init(folder, 4, "k_proj,down_proj", out_dir=tmp_path / "g", mode="general")
    theta = load_file(tmp_path / "g" / "condlora_theta.safetensors")
    assert theta["self_attn.k_proj.theta_A"].shape == (16, 4)  # (m, r): k_proj is 16×32
    assert theta["self_attn.k_proj.theta_B"].shape == (32, 4)
    assert theta["mlp.down_proj.theta_A"].abs().max() <= 1 / math.sqrt(32)  # fan-in m = 32
    assert {r["module_type"]: r["fan_in"] for r in res.records} == {"self_attn.k_proj": 16, "mlp.down_proj": 32}


@pytest.mark.realmodel
@pytest.mark.parametrize("mode,targets", [("general", "q_proj,k_proj,down_proj"), ("official", "q_proj,o_proj")])
def test_warm_start_recovers_known_theta(stories_path, tmp_path, mode, targets):
    base = open_base(stories_path)
    layers = target_layers(base, targets)
    gen = torch.Generator().manual_seed(5)
    truth, mods = {}, []
    for mt, ls in layers.items():
        m, n = ls[0].shape
        shA, shB = ((R, n), (R, n)) if mode == "official" else ((m, R), (n, R))
        tA, tB = torch.randn(*shA, generator=gen, dtype=torch.float64), torch.randn(*shB, generator=gen, dtype=torch.float64)
        truth[mt] = (tA, tB)
        for x in ls:
            A, B = condlora_factors(tA, tB, base.get(x.weight).double(), mode)
            mods.append(lora_module(x, A.float(), B.float(), alpha=8.0))  # s = 2
    save_peft_adapter(tmp_path / "ad", mods)
    res = condlora_init(stories_path, None, None, out_dir=tmp_path / "warm", mode=mode, from_adapter=tmp_path / "ad",
                        alpha=8.0)
    theta = load_file(tmp_path / "warm" / "condlora_theta.safetensors")
    for rec in res.records:
        assert rec["init"] == "warm_start" and rec["fit"]["layers"] == [0, 1, 2, 3, 4]
        assert rec["fit"]["residual_A"] < 1e-5 and rec["fit"]["residual_B"] < 1e-5, rec
    for mt, (tA, tB) in truth.items():
        assert torch.allclose(theta[f"{mt}.theta_A"].double(), tA, rtol=1e-4, atol=1e-4)
        assert torch.allclose(theta[f"{mt}.theta_B"].double(), tB, rtol=1e-4, atol=1e-4)
    # the written adapter reproduces every ΔW; with s = 1 instead of 2, Θ_B doubles so s·B A is unchanged
    orig, warm = load_adapter(tmp_path / "ad"), load_adapter(tmp_path / "warm" / "peft")
    for m in orig:
        assert torch.allclose(warm[m.name].delta(), m.delta(), rtol=1e-4, atol=1e-4)
    condlora_init(stories_path, None, None, out_dir=tmp_path / "s1", mode=mode, from_adapter=tmp_path / "ad")
    theta1 = load_file(tmp_path / "s1" / "condlora_theta.safetensors")
    mt = next(iter(truth))
    assert torch.allclose(theta1[f"{mt}.theta_B"].double(), 2 * truth[mt][1], rtol=1e-4, atol=1e-4)


def test_warm_start_rank_mismatch_and_missing_rank(tiny_llama, llama_adapter, tmp_path):
    _, folder = tiny_llama
    with pytest.raises(ConfigError, match="rank"):
        condlora_init(folder, 4, None, out_dir=tmp_path / "x", from_adapter=llama_adapter[1], mode="general")
    with pytest.raises(ConfigError, match="no rank"):
        condlora_init(folder, None, "q_proj", out_dir=tmp_path / "y")


@pytest.mark.realmodel
def test_init_loads_in_peft_on_stories(stories_path, stories_model, tmp_path):
    condlora_init(stories_path, 4, "q_proj,v_proj,up_proj", out_dir=tmp_path / "cl", mode="general")
    pm = load_with_peft(stories_model, tmp_path / "cl" / "peft")
    ids = token_ids(512)
    assert torch.equal(pm(ids).logits, stories_model(ids).logits)


def test_analysis_with_rank_pattern_and_alpha_pattern(llama_adapter, tiny_llama):
    """Layers of different rank are compared with φ's min(i, j) normalisation, one by one."""
    an = condlora_analysis(llama_adapter[1], tiny_llama[1], device="cpu", dtype="float64")
    g = an.grid("self_attn.q_proj", "B")
    assert g.ranks == (4, 2, 4)
    assert torch.allclose(torch.diagonal(g.phi), torch.ones(3, dtype=torch.float64))
    assert 0 <= float(g.phi[0, 1]) <= 1 and g.equation == "W0 C_B = B"
    assert an.grid("self_attn.v_proj", "A").equation == "W0^T C_A = A^T"  # v_proj is 16×32: general
    # down_proj W0 is 32×48: C_A (m, r) lives in R^32, C_B (n, r) in R^48
    assert an.grid("mlp.down_proj", "A").dim == 32 and an.grid("mlp.down_proj", "B").dim == 48


def test_gpt2_conv1d_factors_use_the_pytorch_layout(tiny_gpt2, tmp_path):
    model, folder = tiny_gpt2
    condlora_init(folder, 4, "c_attn", out_dir=tmp_path / "g", mode="general")
    pm = load_with_peft(model, tmp_path / "g" / "peft")
    ids = token_ids(64)
    assert torch.equal(pm(ids).logits, model(ids).logits)
    theta = load_file(tmp_path / "g" / "condlora_theta.safetensors")
    W0 = model.transformer.h[1].attn.c_attn.weight.detach().T  # Conv1D stores (n, m): (m, n) = (96, 32)
    A, _ = condlora_factors(theta["attn.c_attn.theta_A"], theta["attn.c_attn.theta_B"], W0, "general")
    assert torch.allclose(load_adapter(tmp_path / "g" / "peft")["transformer.h.1.attn.c_attn"].A, A, atol=1e-6)


def test_gpt2_analysis_transposes_conv1d_base(gpt2_adapter, tiny_gpt2):
    """attn.c_proj is a square Conv1D: W0 is the stored weight transposed; checked against NumPy."""
    _, folder = gpt2_adapter
    model, base_folder = tiny_gpt2
    ad = load_adapter(folder)
    an = condlora_analysis(ad, base_folder, device="cpu", dtype="float64")
    g = an.grid("attn.c_proj", "A")
    assert g.equation == "W0 C_A = A^T" and an.grid("attn.c_attn", "A").equation == "W0^T C_A = A^T"
    Us = []
    for block in (0, 1):
        m = ad[f"transformer.h.{block}.attn.c_proj"]
        W0 = model.transformer.h[block].attn.c_proj.weight.detach().double().T.numpy()  # (m, n)
        C = np.linalg.solve(W0, m.A.double().numpy().T)
        Us.append(np.linalg.svd(C, full_matrices=False)[0][:, : m.rank])
    ref = np.sum((Us[0].T @ Us[1]) ** 2) / ad["transformer.h.0.attn.c_proj"].rank
    assert abs(float(g.phi[0, 1]) - ref) < 1e-9


def test_mode_is_chosen_per_module_type_in_analysis_init_and_train(stories_path, tmp_path):
    """stories260K: q_proj 64×64 (square), v_proj 32×64. One rule (methods.condlora.condlora_modes) everywhere:
    official for q, general for v. Before: the analysis chose per type, but init and train chose one mode for
    all types (general, because v_proj is not square)."""
    from lora_lens.methods.condlora import EQUATIONS
    from lora_lens.train import TrainConfig, prepare

    want = {"self_attn.q_proj": "official", "self_attn.v_proj": "general"}
    res = condlora_init(stories_path, R, "q_proj,v_proj", out_dir=tmp_path / "cl", device="cpu")
    assert res.description.params["modes"] == want and res.description.mode == "auto"
    assert {r["module_type"]: r["mode"] for r in res.records} == want
    theta = load_file(tmp_path / "cl" / "condlora_theta.safetensors")
    assert theta["self_attn.q_proj.theta_A"].shape == (R, 64)  # official Θ_A (r, n)
    assert theta["self_attn.v_proj.theta_A"].shape == (32, R)  # general Θ_A (m, r)

    run = prepare(stories_path, TrainConfig(method="condlora", steps=1, batch_size=1, seq_len=8, device="cpu"))
    assert {t: th.mode for t, th in run.adapted.thetas.items()} == want
    again = prepare(stories_path, TrainConfig(method="condlora", steps=1, batch_size=1, seq_len=8, device="cpu"),
                    init=tmp_path / "cl")  # the init folder's per-type forms are read back
    assert {t: th.mode for t, th in again.adapted.thetas.items()} == want

    adapter = _random_adapter(stories_path, "q_proj,v_proj", tmp_path / "ad")
    an = condlora_analysis(adapter, stories_path, device="cpu")
    by_eq = {eq: mode for (mode, side), eq in EQUATIONS.items() if side == "A"}
    assert {g.module_type: by_eq[g.equation] for g in an.grids if g.side == "A"} == want
