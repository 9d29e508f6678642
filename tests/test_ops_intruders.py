"""lora-lens intruders: the reduced adapter equals the installed PEFT's reduce_intruder_dimension on real MiniLM;
λ = 1 changes nothing; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lora_lens import load_adapter
from lora_lens.errors import ConfigError
from lora_lens.ops.intruders import reduce_intruders

from .cli_utils import assert_bad_input, run


@pytest.fixture(scope="module")
def minilm_adapter(minilm_path, tmp_path_factory):
    """A PEFT adapter on MiniLM's query and value whose ΔW is as large as W (value) or small (query)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                big = 1.0 if "value" in n else 0.05
                mod.lora_A["default"].weight.copy_(torch.randn(4, 384, generator=g) / 384 ** 0.5)
                mod.lora_B["default"].weight.copy_(big * torch.randn(384, 4, generator=g))
    folder = tmp_path_factory.mktemp("intr") / "adapter"
    pm.save_pretrained(folder)
    return folder


def _peft_deltas(base_path, folder, adapter="default", reduce=None, dtype=torch.float32, **kw):
    import peft
    import transformers

    model = transformers.AutoModel.from_pretrained(base_path, dtype=dtype)
    pm = peft.PeftModel.from_pretrained(model, folder)
    if reduce is not None:
        from peft.tuners.lora.intruders import reduce_intruder_dimension

        reduce_intruder_dimension(pm, mitigation_lambda=reduce, logging_sink=None, **kw)
        adapter = "intruder_reduced"
    return {n.removeprefix("base_model.model."): m.get_delta_weight(adapter).detach().double()
            for n, m in pm.named_modules() if hasattr(m, "lora_A") and adapter in m.lora_A}


#: (λ, k, ε, dtype, tolerance): float64 on both sides shows the maths is PEFT's (to the float32 rounding of
#: the factors we write in the adapter's dtype, measured 3.5e-8); float32 on both
#: sides differs by the rounding of two float32 SVDs, amplified by the gap σ_r − σ_{r+1} of ΔW' (measured
#: 1e-6 at λ = 0.75, 4e-5 at λ = 0)
CASES = [(0.75, 10, 0.5, torch.float32, 1e-5), (0.0, 20, 0.6, torch.float32, 2e-4), (0.0, 20, 0.6, torch.float64, 2e-7)]


@pytest.mark.parametrize("lam,top_k,eps,dtype,tol", CASES)
def test_equals_peft_reduce_intruder_dimension(minilm_path, minilm_adapter, tmp_path, lam, top_k, eps, dtype, tol):
    pytest.importorskip("peft.tuners.lora.intruders")
    res = reduce_intruders(load_adapter(minilm_adapter), minilm_path, tmp_path / "out", reduce=lam, top_k=top_k,
                           epsilon=eps, dtype=str(dtype).removeprefix("torch."))
    counts = {m.name: len(m.intruders) for m in res.modules}
    assert res.total > 0 and min(counts.values()) == 0  # some modules have intruders, some none
    want = _peft_deltas(minilm_path, minilm_adapter, reduce=lam, dtype=dtype, top_k=top_k, threshold_epsilon=eps)
    got = _peft_deltas(minilm_path, tmp_path / "out", dtype=dtype)
    before = _peft_deltas(minilm_path, minilm_adapter, dtype=dtype)
    assert set(got) == set(want) == set(counts)
    for n in want:
        assert float((got[n] - want[n]).norm()) <= tol * float(want[n].norm()), n
        if counts[n]:
            assert float((want[n] - before[n]).norm()) > 1e-2 * float(before[n].norm()), n  # a real change
        else:
            torch.testing.assert_close(got[n], before[n], rtol=0, atol=0)  # no intruder: factors copied as they are


def test_lambda_one_keeps_the_update(minilm_path, minilm_adapter):
    ad = load_adapter(minilm_adapter)
    res = reduce_intruders(ad, minilm_path, None, reduce=1.0, dtype="float64")
    assert res.total > 0
    for m, r in zip(ad, res.modules):
        # nothing removed: ΔW' = ΔW has rank r, so refactoring at rank r is exact
        assert r.removed == 0 and r.truncation_error < 1e-12
        torch.testing.assert_close(r.module.delta(), m.delta(), rtol=0, atol=1e-6 * float(m.delta().abs().max()))


def test_cli_and_bad_input(minilm_path, minilm_adapter, tmp_path):
    r = run("intruders", minilm_adapter, "--base", minilm_path, "--reduce", 0.5, "-o", tmp_path / "o", "--json", "-q")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["kind"] == "intruder_reduction" and obj["total"] > 0
    assert_bad_input(run("intruders", minilm_adapter, "--base", minilm_path, "--reduce", 1.5, "-o", tmp_path / "o2"),
                     "--reduce")
    assert_bad_input(run("intruders", minilm_adapter, "--base", minilm_path, "--reduce", 0.5, "--epsilon", 0,
                         "-o", tmp_path / "o3"), "--epsilon")
    with pytest.raises(ConfigError, match="out of range"):
        reduce_intruders(load_adapter(minilm_adapter), minilm_path, None, reduce=-0.1)


def _tiny_peft(model, folder, **config):
    import copy

    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                   init_lora_weights=False, **config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(1.0)  # a trained copy that differs from the base
    pm.save_pretrained(folder)
    return folder


def test_dora_refused_and_modules_to_save_carried(tiny_llama, tmp_path):
    """The reduced adapter is written as plain LoRA: a DoRA adapter's magnitudes would be dropped (another model),
    so it is refused; a PEFT adapter's trained modules_to_save copies are written with it, not lost."""
    from safetensors.torch import load_file

    model, base = tiny_llama
    dora = _tiny_peft(model, tmp_path / "dora", use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        reduce_intruders(load_adapter(dora), base, tmp_path / "dora_out", reduce=0.0, epsilon=0.99)
    assert not (tmp_path / "dora_out").exists()
    mts = _tiny_peft(model, tmp_path / "mts", modules_to_save=["lm_head"])
    res = reduce_intruders(load_adapter(mts), base, tmp_path / "mts_out", reduce=0.0, epsilon=0.99)
    assert res.total > 0
    src, out = load_file(mts / "adapter_model.safetensors"), load_file(tmp_path / "mts_out" / "adapter_model.safetensors")
    copies = [k for k in src if "lora_" not in k]
    assert copies and all(torch.equal(out[k], src[k]) for k in copies)
    config = json.loads((tmp_path / "mts_out" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
