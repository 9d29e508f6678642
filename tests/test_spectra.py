"""Spectra of LoRA updates: factored == materialized (float64, PEFT's own ΔW), metrics against direct formulas."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from lora_lens import NonFiniteError, load_adapter
from lora_lens.decompose import adapter_singular_values, decompose_adapter
from lora_lens.errors import ConfigError
from lora_lens.linalg import factored_svd, factored_svdvals
from lora_lens.spectra import adapter_spectra, spectrum_metrics
from lora_lens.types import LayerKey, LoraModule


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _module(name, block, m, n, r, seed, scaling=0.5, zero_B=False, dtype=torch.float32):
    B = torch.zeros(m, r, dtype=dtype) if zero_B else _rand(m, r, seed=seed, dtype=dtype)
    return LoraModule(name=f"model.layers.{block}.{name}", key=LayerKey("model.layers", block, name),
                      A=_rand(r, n, seed=seed + 1000, dtype=dtype), B=B, alpha=scaling * r, scaling=scaling)


def _random_modules():
    """Three blocks of q (40x40, r=4), up (56x40, r=4), down (40x56, r=6), head (3x40, r=8 > m)."""
    mods = []
    for b in range(3):
        mods += [_module("q", b, 40, 40, 4, 10 * b), _module("up", b, 56, 40, 4, 10 * b + 1, scaling=-2.0),
                 _module("down", b, 40, 56, 6, 10 * b + 2), _module("head", b, 3, 40, 8, 10 * b + 3)]
    return mods


def _materialized_svdvals(m: LoraModule) -> torch.Tensor:
    """The naive reference: form ΔW = s·B·A in float64 and take every singular value."""
    return torch.linalg.svdvals(m.delta(torch.float64))


def _peft_deltas(pm) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer as PEFT itself computes it (get_delta_weight), in float64 and the stored layout."""
    from peft.tuners.lora import LoraLayer

    pm = copy.deepcopy(pm).double()
    return {name.removeprefix("base_model.model."): mod.get_delta_weight("default").detach()
            for name, mod in pm.named_modules() if isinstance(mod, LoraLayer) and "default" in mod.lora_A}


def _assert_matches_peft(pm, folder, rtol64=1e-10, rtol32=2e-5):
    adapter = load_adapter(folder)
    deltas = _peft_deltas(pm)
    assert set(deltas) == set(adapter.names)
    for dtype, rtol in (("float64", rtol64), ("float32", rtol32)):
        res = adapter_spectra(adapter, device="cpu", dtype=dtype)
        for rep in res.layers:
            ref = torch.linalg.svdvals(deltas[rep.name])[: len(rep.singular_values)]
            scale = float(ref[0])
            assert scale > 0
            assert (rep.singular_values - ref).abs().max().item() <= rtol * scale, (rep.name, dtype)
            assert rep.fro_norm == pytest.approx(torch.linalg.matrix_norm(deltas[rep.name]).item(), rel=10 * rtol)
    return res


def test_factored_svdvals_equals_materialized_float64_svd():
    for m in _random_modules() + [_module("z", 0, 20, 30, 4, 5, zero_B=True)]:
        ref = _materialized_svdvals(m)
        S = factored_svdvals(m.B, m.A, m.scaling, dtype=torch.float64)
        k = min(m.rank, *m.shape)
        assert S.shape == (k,)
        assert torch.allclose(S, ref[:k], rtol=1e-10, atol=1e-12 * max(ref[0].item(), 1.0))


def test_factored_svd_rank_above_a_side_gives_consistent_factors():
    # r=8 on a 3-row head: the (kb, ka) core is 3x8; U, S, Vh must all have k = 3 (a bug before: Vh had 8 rows)
    m = _module("head", 0, 3, 40, 8, 3, scaling=-1.5, dtype=torch.float64)
    U, S, Vh = factored_svd(m.B, m.A, m.scaling)
    assert U.shape == (3, 3) and S.shape == (3,) and Vh.shape == (3, 40)
    assert torch.allclose((U * S) @ Vh, m.delta(), atol=1e-12)
    spec = decompose_adapter([m], device="cpu", dtype="float64")[m.name]
    assert spec.k == 3 and torch.allclose((spec.U * spec.S) @ spec.Vh, m.delta(), atol=1e-12)


def test_batched_equals_looped_and_chunked_and_decompose_adapter():
    mods = _random_modules()
    batched = adapter_singular_values(mods, device="cpu", dtype="float64")
    assert list(batched) == [m.name for m in mods]
    chunked = adapter_singular_values(mods, device="cpu", dtype="float64", max_memory=1)  # one module per chunk
    full = decompose_adapter(mods, device="cpu", dtype="float64")
    for m in mods:
        looped = adapter_singular_values([m], device="cpu", dtype="float64")[m.name]
        assert torch.allclose(batched[m.name], looped, rtol=1e-12)
        assert torch.allclose(chunked[m.name], looped, rtol=1e-12)
        assert torch.allclose(full[m.name].S, looped, rtol=1e-12)
        assert torch.allclose(looped, _materialized_svdvals(m)[: len(looped)], rtol=1e-10)


def test_progress_reports_every_chunk():
    calls = []
    adapter_singular_values(_random_modules(), device="cpu", max_memory=1, progress=lambda d, t, w: calls.append((d, t)))
    assert [d for d, _ in calls] == list(range(1, 13)) and all(t == 12 for _, t in calls)


def _reference_metrics(s: np.ndarray, energy: float, fro: float) -> dict:
    """Direct float64 formulas, one spectrum at a time (docs/maths.md §1)."""
    cum = np.cumsum(s ** 2)
    total = float(cum[-1])  # not np.sum: pairwise summation may round below cum[-1]
    p = s / s.sum()
    p = p[p > 0]
    return {
        "energy": cum / total,
        "fro_norm": math.sqrt(total),
        "effective_rank": math.exp(-(p * np.log(p)).sum()),
        "stable_rank": total / s[0] ** 2,
        "rank_at_energy": int(np.argmax(cum >= energy * total)) + 1,
        "rank_at_fro": int(np.argmax(np.sqrt(cum) / math.sqrt(total) >= fro)) + 1,
    }


def _kohya_index_sv_fro(S: torch.Tensor, target: float) -> int:
    """kohya sd-scripts ``networks/resize_lora.py`` ``index_sv_fro``, without its final clamp to [1, len(S) - 1]."""
    S_squared = S.pow(2)
    sum_S_squared = torch.cumsum(S_squared, dim=0) / float(torch.sum(S_squared))
    return int(torch.searchsorted(sum_S_squared, target ** 2)) + 1


def test_metrics_against_direct_formulas_peft_and_kohya():
    from peft.tuners.lora.conversion import _find_cutoff_index

    gen = np.random.default_rng(0)
    spectra = [np.sort(gen.gamma(0.5, size=k))[::-1] for k in (1, 2, 5, 16, 16, 33)]
    spectra += [np.ones(4), np.array([3.0, 1e-9, 0.0]), 1.0 / np.arange(1, 65)]
    kmax = max(len(s) for s in spectra)
    padded = torch.zeros(len(spectra), kmax, dtype=torch.float64)
    for i, s in enumerate(spectra):
        padded[i, : len(s)] = torch.from_numpy(s.copy())
    for energy, fro in ((0.9, 0.9), (0.5, 0.7), (1.0, 1.0), (0.25, 0.5)):
        met = spectrum_metrics(padded, energy, fro)
        for i, s in enumerate(spectra):
            ref = _reference_metrics(s, energy, fro)
            k = len(s)
            assert np.allclose(met["energy"][i, :k].numpy(), ref["energy"], rtol=1e-13)
            for name in ("fro_norm", "effective_rank", "stable_rank"):
                assert met[name][i].item() == pytest.approx(ref[name], rel=1e-12), (name, i)
            assert int(met["rank_at_energy"][i]) == ref["rank_at_energy"], (i, energy)
            assert int(met["rank_at_fro"][i]) == ref["rank_at_fro"], (i, fro)
            st = torch.from_numpy(s.copy())
            assert int(met["rank_at_energy"][i]) == _find_cutoff_index(st, energy)  # PEFT itself
            if fro < 1:  # at 1.0 kohya's separate torch.sum can round above cum[-1] and give k + 1 (then clamped)
                assert int(met["rank_at_fro"][i]) == _kohya_index_sv_fro(st, fro)
    # equal σ: effective and stable rank equal the count; a tie at the energy boundary counts as reached
    met = spectrum_metrics(torch.ones(1, 4), 0.5, 0.5)
    assert met["effective_rank"].item() == pytest.approx(4.0) and met["stable_rank"].item() == pytest.approx(4.0)
    assert met["rank_at_energy"].item() == 2 and met["rank_at_fro"].item() == 1


def test_zero_update_has_rank_zero_and_no_nan():
    mods = [_module("q", 0, 20, 30, 4, 1, zero_B=True), _module("q", 1, 20, 30, 4, 2)]
    res = adapter_spectra(mods, device="cpu")
    z, nz = res.layers
    assert z.singular_values.tolist() == [0.0] * 4 and z.energy.tolist() == [1.0] * 4
    assert (z.fro_norm, z.effective_rank, z.stable_rank, z.rank_at_energy, z.rank_at_fro) == (0, 0, 0, 0, 0)
    assert nz.rank_at_energy > 0 and nz.effective_rank > 1
    json.dumps(res.to_dict(), allow_nan=False)  # raises on any NaN/Inf
    assert res.summary["q"].stats["effective_rank"]["min"] == 0.0


def test_nan_factor_refused_naming_module_and_factor():
    good = _module("q", 0, 20, 30, 4, 1)
    A = good.A.clone()
    A[1, 2] = float("nan")
    bad = LoraModule("model.layers.1.q", LayerKey("model.layers", 1, "q"), A, good.B, 2.0, 0.5)
    for fn in (adapter_singular_values, decompose_adapter, adapter_spectra):
        with pytest.raises(NonFiniteError, match=r"'model.layers.1.q' \(lora_A hold NaN/Inf\)"):
            fn([good, bad], device="cpu")


def test_bad_fraction_and_empty_input():
    with pytest.raises(ConfigError, match="fraction"):
        adapter_spectra(_random_modules(), energy=1.5)
    with pytest.raises(ConfigError, match="fraction"):
        spectrum_metrics(torch.ones(1, 2), fro=0.0)
    with pytest.raises(ConfigError, match="no LoRA modules"):
        adapter_spectra([])


def test_records_and_summary_on_llama_fixture(llama_adapter):
    pm, folder = llama_adapter
    res = _assert_matches_peft(pm, folder)
    assert res.path == str(folder) and len(res.layers) == 9
    rep = res["model.layers.1.self_attn.q_proj"]
    assert rep.rank == 2 and rep.block == 1 and rep.module_type == "self_attn.q_proj" and len(rep.singular_values) == 2
    assert res["model.layers.0.mlp.down_proj"].scaling == pytest.approx(3.0 / 4)  # alpha_pattern
    q = res.summary["self_attn.q_proj"]
    assert q.layers == 3 and q.ranks == (2, 4) and q.blocks == (0, 1, 2)
    vals = [r.effective_rank for r in res.layers if r.module_type == "self_attn.q_proj"]
    assert q.stats["effective_rank"]["mean"] == pytest.approx(np.mean(vals))
    assert q.stats["effective_rank"]["min"] == pytest.approx(min(vals))
    assert q.top_singular_values == tuple(r.top_singular_value for r in res.layers if r.module_type == "self_attn.q_proj")
    d = res.to_dict()
    for rec in d["layers"]:
        for f in ("name", "block", "module_type", "rank", "scaling", "singular_values", "energy", "fro_norm",
                  "effective_rank", "stable_rank", "rank_at_energy", "rank_at_fro"):
            assert f in rec
    json.dumps(d, allow_nan=False)


def test_gpt2_conv1d_fixture_matches_peft(gpt2_adapter):
    pm, folder = gpt2_adapter
    res = _assert_matches_peft(pm, folder)  # PEFT's ΔW is in Conv1D's stored (n, m) layout: same σ
    assert {r.layout for r in res.layers} == {"conv1d"}


def test_bert_rslora_fixture_matches_peft(bert_adapter):
    pm, folder = bert_adapter
    res = _assert_matches_peft(pm, folder)
    assert res.layers[0].scaling == pytest.approx(4 / math.sqrt(8))


def test_peft_default_init_is_a_zero_update(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(tiny_llama[0]), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    res = adapter_spectra(tmp_path, device="cpu")
    assert all(r.fro_norm == 0 and r.rank_at_energy == 0 for r in res.layers)
    json.dumps(res.to_dict(), allow_nan=False)


@pytest.mark.realmodel
def test_stories260k_trained_by_peft(stories_path, tmp_path):
    """A few AdamW steps of PEFT LoRA on the real stories260K (B starts at 0), then spectra == PEFT's ΔW."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(stories_path)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    pm.save_pretrained(tmp_path)
    res = _assert_matches_peft(pm, tmp_path)
    assert len(res.layers) == 35 and all(r.fro_norm > 0 for r in res.layers)
    assert set(res.summary) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert res.summary["self_attn.k_proj"].shapes == ((32, 64),)  # GQA: 4 kv heads × head_dim 8


@pytest.mark.realmodel
def test_minilm_adapter_matches_peft(minilm_path, tmp_path):
    transformers = pytest.importorskip("transformers")
    from .adapter_utils import make_peft_adapter

    model = transformers.BertModel.from_pretrained(minilm_path)
    pm = make_peft_adapter(model, tmp_path, seed=3, r=8, lora_alpha=16, target_modules=["query", "value"])
    res = _assert_matches_peft(pm, tmp_path)
    assert len(res.layers) == 12 and res.summary["attention.self.query"].shapes == ((384, 384),)


def test_one_rank_at_energy_and_one_zero_update_result():
    """spectra, reduce and the report's energy curve share one definition (issue 11 §4e): a zero update has
    energy rank 0 and an energy curve of ones everywhere (reduce used to say 1, the report's curve zeros)."""
    import numpy as np

    from lora_lens.methods.reduce import rank_for_energy
    from lora_lens.report.spectra_plots import energy_curve as report_curve
    from lora_lens.spectra import energy_curve, rank_at_energy, spectrum_metrics

    zero = torch.zeros(4, dtype=torch.float64)
    assert int(rank_at_energy(zero, 0.9)) == 0 == int(spectrum_metrics(zero[None])["rank_at_energy"][0])
    assert torch.equal(energy_curve(zero), torch.ones(4, dtype=torch.float64))
    np.testing.assert_array_equal(report_curve(np.zeros(4)), np.ones(4))
    assert rank_for_energy(zero, 0.9) == 1  # a PEFT module needs r ≥ 1: the writer's floor, not another definition
    # ties: cum = [1, 2, 3, 4], 0.5·4 = 2 → j = 2, in every caller
    flat = torch.ones(4, dtype=torch.float64)
    assert int(rank_at_energy(flat, 0.5)) == 2 == rank_for_energy(flat, 0.5)
    S = torch.tensor([[3.0, 2.0, 1.0, 0.5], [1.0, 1e-3, 0.0, 0.0]], dtype=torch.float64)
    for row in S:
        for f in (0.5, 0.9, 0.99, 1.0):
            assert rank_for_energy(row, f) == int(spectrum_metrics(row[None], energy=f)["rank_at_energy"][0])


def test_deeper_half_is_one_definition():
    """Layer similarity and the CondLoRA summary used ≥ L//2 and the last L//2: now both the last ⌈L/2⌉."""
    from lora_lens.compare.baselines import deeper_half
    from lora_lens.compare.similarity import LayerGrid
    from lora_lens.methods.condlora_analysis import ConversionGrid

    L = 5
    phi = torch.arange(L * L, dtype=torch.float64).reshape(L, L)
    deep = deeper_half(L)
    assert deep == [2, 3, 4]
    sub = phi[deep][:, deep]
    want = float(sub[~torch.eye(len(deep), dtype=torch.bool)].mean())
    z = torch.zeros(L, L, dtype=torch.float64)
    lg = LayerGrid("q", tuple(range(L)), tuple("abcde"), 8, (2,) * L, phi, z, z)
    cg = ConversionGrid("q", "A", "W0 C_A = A^T", tuple(range(L)), tuple("abcde"), (2,) * L, 8, phi, z, z,
                        torch.zeros(L))
    assert lg.summary()["deep_mean_offdiag"] == pytest.approx(want)
    assert cg.summary()["phi_offdiag_deep"] == pytest.approx(want)
