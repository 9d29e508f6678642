"""LoRA §7.3 alignment against a direct float64 computation (Linear, Conv1D, prefix-bridged BERT) and bad bases."""

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens import KeyMatchError, NonFiniteError, ShapeError, load_adapter, open_base
from lora_lens.compare import alignment, analyze_alignment
from lora_lens.compute import Compute

from .alignment_refs import base_matrix, ref_alignment


def check_against_reference(adapter, base_folder: Path, strip: str = "", rtol: float = 1e-9, exact_w0=True, **kw):
    state = load_file(base_folder / "model.safetensors")
    res = alignment(adapter, open_base(base_folder), exact_w0=exact_w0, **kw)
    assert [m.name for m in res.modules] == [m.name for m in adapter]  # layer order
    for row in res.modules:
        mod = adapter[row.name]
        assert row.weight == row.name.removeprefix(strip) + ".weight"
        ref = ref_alignment(mod, base_matrix(state, row.weight, mod.layout))
        for k, v in ref.items():
            tol = rtol if res.w0_exact or k != "proj_w0" else max(rtol, 1e-5)  # randomized top-r of W0
            assert getattr(row, k) == pytest.approx(v, rel=tol), (row.name, k)
    return res


def test_llama_alignment_matches_float64(tiny_llama, llama_adapter):
    adapter = load_adapter(llama_adapter[1])
    assert check_against_reference(adapter, Path(tiny_llama[1]), dtype="float64", device="cpu").w0_exact
    # defaults: float32, W0's top-r by the randomized range finder (down_proj 32×48: r + 16 < 32)
    assert not check_against_reference(adapter, Path(tiny_llama[1]), rtol=1e-4, exact_w0=False).w0_exact


def test_gpt2_conv1d_alignment_transposes_the_base(tiny_gpt2, gpt2_adapter):
    adapter = load_adapter(gpt2_adapter[1])
    assert {m.layout for m in adapter} == {"conv1d"}
    res = check_against_reference(adapter, Path(tiny_gpt2[1]), dtype="float64")
    c_attn = next(r for r in res.modules if r.name.endswith("attn.c_attn"))
    assert (adapter[c_attn.name].shape) == (96, 32)


def test_bert_alignment_bridges_prefix(tiny_bert, bert_adapter):
    adapter = load_adapter(bert_adapter[1])
    check_against_reference(adapter, Path(tiny_bert[1]), strip="bert.", dtype="float64")


def test_random_projection_expectation_and_determinism(tiny_llama, llama_adapter):
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    a = alignment(adapter, base, draws=64, seed=3)
    for row in a.modules:
        m, n = adapter[row.name].shape
        expected = row.w0_norm * row.rank / np.sqrt(m * n)  # E‖UᵀW0V‖² = (r/m)(r/n)‖W0‖²
        assert 0.6 * expected < row.proj_random < 1.2 * expected
        assert row.proj_random < row.proj_w0
    b = alignment(adapter, base, draws=64, seed=3)
    assert [r.proj_random for r in a.modules] == [r.proj_random for r in b.modules]


def test_analysis_agrees_with_alignment(tiny_llama, llama_adapter):
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    a = alignment(adapter, base, dtype="float64", exact_w0=True)
    b = analyze_alignment(adapter, base, dtype="float64").alignment
    for x, y in zip(a.modules, b.modules):
        assert x.name == y.name and x.proj_w0 == pytest.approx(y.proj_w0, rel=1e-10)
        assert x.amplification == pytest.approx(y.amplification, rel=1e-10)
        assert x.proj_random == pytest.approx(y.proj_random, rel=1e-10)


def test_alignment_same_numbers_for_every_max_memory(tiny_llama, llama_adapter):
    """W0's randomized top-r (r + 16 < 32 here) is sketched per weight name: no number depends on the budget.

    Before per-item seeds one sketch was drawn per chunk, and proj_w0 moved with ``max_memory``. The
    runs differ only in batching, so they agree to float64 round-off: ≤ 10·max(m, n)·u relative per
    backward-stable product/QR of the range finder (2·4 + 3 of them), ‖W0‖-sized numbers.
    """
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    whole = alignment(adapter, base, compute=Compute("cpu", "float64", max_memory=None))
    single = alignment(adapter, base, compute=Compute("cpu", "float64", max_memory=1))
    assert not whole.w0_exact
    tol = 10 * (2 * 4 + 3) * 48 * np.finfo(np.float64).eps
    for x, y in zip(whole.modules, single.modules):
        assert x.name == y.name
        for k in ("delta_norm", "proj_delta", "proj_w0", "proj_random"):
            assert getattr(x, k) == pytest.approx(getattr(y, k), rel=tol, abs=tol * x.w0_norm)


def test_wrong_base_refused(llama_adapter, tiny_gpt2):
    with pytest.raises(KeyMatchError, match="no weight for"):
        alignment(load_adapter(llama_adapter[1]), open_base(tiny_gpt2[1]))


def test_shape_mismatch_names_both_tensors(tiny_llama, llama_adapter, tmp_path):
    state = load_file(Path(tiny_llama[1]) / "model.safetensors")
    name = "model.layers.2.self_attn.v_proj.weight"
    state[name] = torch.zeros(8, 32)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ShapeError) as e:
        alignment(load_adapter(llama_adapter[1]), open_base(tmp_path))
    assert "model.layers.2.self_attn.v_proj" in str(e.value) and name in str(e.value) and "8x32" in str(e.value)


def test_non_finite_base_weight_refused(tiny_llama, llama_adapter, tmp_path):
    shutil.copy(Path(tiny_llama[1]) / "config.json", tmp_path)
    state = load_file(Path(tiny_llama[1]) / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    state[name][3, 4] = float("nan")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(NonFiniteError, match=name.replace(".", r"\.")):
        alignment(load_adapter(llama_adapter[1]), open_base(tmp_path))


def test_chunked_equals_batched_and_reports_progress(tiny_llama, llama_adapter):
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    calls = []
    one = analyze_alignment(adapter, base, dtype="float64", max_memory=1, progress=lambda *a: calls.append(a))
    whole = analyze_alignment(adapter, base, dtype="float64", max_memory=None)
    assert len(calls) == len(adapter) and calls[-1][:2] == (len(adapter), len(adapter))
    for x, y in zip(one.alignment.modules, whole.alignment.modules):
        assert x.proj_delta == pytest.approx(y.proj_delta, rel=1e-10) and x.proj_w0 == pytest.approx(y.proj_w0, rel=1e-10)
        assert x.proj_random == pytest.approx(y.proj_random, rel=1e-10)  # seeded per shape, not per chunk
    for x, y in zip(one.intruders.modules, whole.intruders.modules):
        assert np.allclose(x.max_cos, y.max_cos, atol=1e-10)


def test_zero_update_is_flagged_in_alignment(tiny_llama, tmp_path):
    """A CoRA-style init (A = 0) has ΔW = 0: its projection numbers must come with a warning."""
    from lora_lens import load_adapter, open_base, save_peft_adapter
    from lora_lens.compare import analyze_alignment

    from .adapter_utils import make_peft_adapter

    model, folder = tiny_llama
    make_peft_adapter(model, tmp_path / "ad", r=2, lora_alpha=2, target_modules=["q_proj"])
    ad = load_adapter(tmp_path / "ad")
    zero = [replace(m, A=torch.zeros_like(m.A)) for m in ad]
    save_peft_adapter(tmp_path / "zero", zero)
    res = analyze_alignment(load_adapter(tmp_path / "zero"), open_base(folder), device="cpu")
    assert any("ΔW = 0" in n for n in res.alignment.notes)
    assert not any("ΔW = 0" in n for n in analyze_alignment(ad, open_base(folder), device="cpu").alignment.notes)


def test_alignment_runs_with_half_passes_asked(tiny_llama, llama_adapter):
    """``Compute(half_passes=True)`` is for bf16 stacks; W0 here is stacked in the compute dtype, so the range finder
    runs its float32 passes (it refused the float32 W0 with a ValueError) and the numbers are those of ``False``."""
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    on = alignment(adapter, base, compute=Compute("cpu", half_passes=True))
    off = alignment(adapter, base, compute=Compute("cpu", half_passes=False))
    assert not on.w0_exact
    assert [m.proj_w0 for m in on.modules] == [m.proj_w0 for m in off.modules]
