"""Per-module layout of mixed Linear + Conv1D adapters, as PEFT decides it (issue 11 §4a).

PEFT's ``dispatch_default`` forces ``fan_in_fan_out`` per module: False for a
``nn.Linear``, True for a ``Conv1D``, whatever the config says; and the config it
saves holds whatever the *last* wrapped module left there. So neither value of
the saved flag describes every module of a GPT-2 adapter that also targets a
Linear head.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch

from lora_lens import load_adapter, open_base, save_peft_adapter
from lora_lens.compare import alignment
from lora_lens.io.layout import with_base_layouts

LINEAR = ("lm_head", "multiple_choice_head.summary")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, request):
    """A tiny GPT-2 double-heads model: Conv1D blocks, a non-square Linear ``lm_head`` (64×32, untied)
    and a square Linear ``multiple_choice_head.summary`` (32×32); a PEFT adapter on all four kinds."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(3)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32,
                                  tie_word_embeddings=False, summary_proj_to_labels=False)
    model = transformers.GPT2DoubleHeadsModel(cfg).eval()
    assert type(model.multiple_choice_head.summary) is torch.nn.Linear
    assert model.multiple_choice_head.summary.weight.shape == (32, 32)
    base = tmp_path_factory.mktemp("gpt2_double_heads")
    model.save_pretrained(base)
    lc = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, fan_in_fan_out=True,
                         target_modules=["c_attn", "c_proj", "lm_head", "summary"])
    pm = peft.get_peft_model(copy.deepcopy(model), lc).eval()
    folder = tmp_path_factory.mktemp("mixed_adapter")
    pm.save_pretrained(folder)
    return model, pm, base, folder


def with_flag(folder, tmp_path, value: bool):
    """A copy of the adapter whose config says ``fan_in_fan_out = value``."""
    out = tmp_path / f"fifo_{value}"
    shutil.copytree(folder, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = value
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def peft_reference(pm) -> dict[str, float]:
    """proj_delta = ‖U_rᵀ W V_r‖_F in float64 from PEFT's own modules, in the *stored* layout.

    PEFT's ``fan_in_fan_out`` per module says how ΔW sits on the stored weight;
    the projection norm is the same for (ΔW, W0) and (ΔWᵀ, W0ᵀ), so no layout
    knowledge of lora_lens enters the reference.
    """
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in pm.base_model.model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        A = layer.lora_A["default"].weight.detach().double()
        B = layer.lora_B["default"].weight.detach().double()
        d = layer.scaling["default"] * (B @ A)
        d = d.T if layer.fan_in_fan_out else d  # PEFT's own per-module decision
        W = layer.get_base_layer().weight.detach().double()
        U, _, Vh = torch.linalg.svd(d)
        r = A.shape[0]
        out[name] = float(torch.linalg.matrix_norm(U[:, :r].T @ W @ Vh[:r].T))
    return out


@pytest.mark.parametrize("square_only", [False, True])
@pytest.mark.parametrize("flag", [True, False])
def test_alignment_of_a_mixed_adapter_matches_peft(mixed, tmp_path, flag, square_only):
    """Before the fix: flag=True → lm_head (non-square Linear) raised ShapeError, and with only the square
    modules the square Linear ``summary`` was read transposed (wrong proj_delta); flag=False (what PEFT
    saves here) → c_attn raised ShapeError, and the square Conv1D ``attn.c_proj`` was read untransposed."""
    _, pm, base, folder = mixed
    ref = peft_reference(pm)
    assert {n.split(".")[-1] for n in ref} == {"c_attn", "c_proj", "lm_head", "summary"}
    adapter = load_adapter(with_flag(folder, tmp_path, flag))
    if square_only:
        adapter = replace(adapter, modules=tuple(m for m in adapter if m.shape[0] == m.shape[1]))
        ref = {k: v for k, v in ref.items() if k in adapter.names}
        assert {n.split(".")[-1] for n in ref} == {"c_proj", "summary"}
    res = alignment(adapter, open_base(base), dtype="float64", device="cpu", exact_w0=True)
    got = {m.name: m.proj_delta for m in res.modules}
    assert set(got) == set(ref)
    for name, v in ref.items():
        assert got[name] == pytest.approx(v, rel=1e-9), name
    # the square Linear and square Conv1D are decided by the base's config.json, not guessed
    assert not any("ambiguous" in n for n in res.notes)


def test_layouts_follow_the_base_module_types(mixed):
    model, _, base, folder = mixed
    ad = with_base_layouts(load_adapter(folder), open_base(base))
    for m in ad:
        module = model.get_submodule(m.name)
        want = "linear" if isinstance(module, torch.nn.Linear) else "conv1d"
        assert m.layout == want, m.name
        assert m.base_shape == tuple(module.weight.shape)
    assert {m.layout for m in ad if m.name.endswith(LINEAR)} == {"linear"}


def test_square_layout_without_config_is_flagged(mixed, tmp_path):
    """A bare weights file (no config.json) cannot say whether a square weight is a Linear or a Conv1D."""
    _, _, base, folder = mixed
    bare = tmp_path / "bare.safetensors"
    shutil.copy(base / "model.safetensors", bare)
    ad = with_base_layouts(load_adapter(folder), open_base(bare))
    assert any("ambiguous" in f for f in ad.flags)
    # the non-square ones are still decided by their shapes
    assert ad["lm_head"].layout == "linear" and ad["transformer.h.0.attn.c_attn"].layout == "conv1d"


def test_writing_round_trips_the_layouts_and_peft_loads_it(mixed, tmp_path):
    from peft import PeftModel

    model, pm, base, folder = mixed
    ad = with_base_layouts(load_adapter(folder), open_base(base))
    out = save_peft_adapter(tmp_path / "copy", ad.modules)
    again = load_adapter(out)  # no base: the layouts come from what lora_lens wrote
    assert [(m.name, m.layout) for m in again] == [(m.name, m.layout) for m in ad]
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want, got = pm(ids).logits, loaded(ids).logits
    # same factors, same module code: identical arithmetic, so bit-for-bit equal
    assert torch.equal(got, want)
