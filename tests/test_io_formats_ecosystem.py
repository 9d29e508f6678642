"""Adapters written by the ecosystems' own code: PEFT LoHa / LoKr / AdaLoRA, diffusers LoRA on a tiny UNet.

References are the libraries' own ``get_delta_weight`` run in float64 (the
model is cast with ``.double()`` first), so the readers' factored forms are
checked against an independent implementation of each update. Tolerances:
float64 products of O(1) entries summed over ≤ 100 terms, so 1e-12 relative
to ‖ΔW‖; singular values through the factored SVD vs ``svdvals`` of the dense
reference agree to ~κ·u, 1e-10 relative to σ₁ here.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens.io import load_adapter
from lora_lens.keys import kohya_stem
from lora_lens.spectra import adapter_spectra

from .cli_utils import run

peft = pytest.importorskip("peft")


def check_against(adapter, refs: dict[str, torch.Tensor]):
    assert sorted(m.name for m in adapter) == sorted(refs)
    sv = {r.name: r.singular_values for r in adapter_spectra(adapter, dtype="float64", device="cpu").layers}
    for name, ref in refs.items():
        assert torch.allclose(adapter[name].delta(), ref, atol=1e-12 * float(ref.norm())), name
        want = torch.linalg.svdvals(ref)[: len(sv[name])]
        assert torch.allclose(sv[name].double(), want, atol=1e-10 * float(want[0])), name


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(12, 20)
        self.v = torch.nn.Linear(12, 16)
        self.conv = torch.nn.Conv2d(4, 6, 3)

    def forward(self, x):
        return self.q(x)


def peft_refs(pm, names):
    pm = copy.deepcopy(pm).double()
    out = {}
    for n in names:
        layer = pm.base_model.model.get_submodule(n)
        d = layer.get_delta_weight("default").detach()
        out[n] = d.reshape(d.shape[0], -1)
    return out


@pytest.mark.parametrize("config, kind", [
    (lambda: peft.LoHaConfig(r=3, alpha=5, target_modules=["q", "v", "conv"], init_weights=False), "loha"),
    (lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["q", "v"], init_weights=False), "lokr"),
    (lambda: peft.LoKrConfig(r=2, alpha=6, target_modules=["q", "v"], init_weights=False, decompose_both=True,
                             rank_pattern={"v": 1}, alpha_pattern={"q": 3.0}), "lokr"),
    (lambda: peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=3, target_modules=["q", "v"], total_step=10,
                                init_lora_weights=False), "adalora"),
])
def test_peft_low_rank_tuners_match_peft_delta(tmp_path, config, kind):
    torch.manual_seed(0)
    cfg = config()
    pm = peft.get_peft_model(Tiny(), cfg)
    if kind == "adalora":  # E starts at zero in AdaLoRA: give it values, as training would
        for n in ("q", "v"):
            torch.nn.init.normal_(pm.base_model.model.get_submodule(n).lora_E["default"])
    pm.double().save_pretrained(tmp_path)  # float64 factors: their products are exact, like the reference's
    a = load_adapter(tmp_path)
    assert a.format == f"peft-{kind}" and all(m.kind == kind for m in a)
    check_against(a, peft_refs(pm, [m.name for m in a]))
    r = run("inspect", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    assert {m["kind"] for m in json.loads(r.stdout)["modules"]} == {kind}


# --- diffusers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_lora(tmp_path_factory):
    """A tiny UNet2DConditionModel with a PEFT LoRA saved by diffusers (alpha in its metadata)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                          init_lora_weights=False)
    unet.add_adapter(cfg)
    folder = tmp_path_factory.mktemp("diffusers_lora")
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=cfg.to_dict())
    return unet, folder


def test_diffusers_lora_matches_peft_delta_and_keeps_blocks_apart(diffusers_lora):
    unet, folder = diffusers_lora
    a = load_adapter(folder)
    assert a.format == "diffusers" and {m.scaling for m in a} == {2.0}
    double = copy.deepcopy(unet).double()
    refs = {}
    for m in a:
        d = double.get_submodule(m.name.removeprefix("unet.")).get_delta_weight("default").detach()
        refs[m.name] = d.reshape(d.shape[0], -1)
    check_against(a, refs)
    # down, mid and up blocks hold the same module types: distinct blocks, in network order
    to_q = [m for m in a if m.key.module == "attn1.to_q"]
    assert [m.name.split(".")[1] for m in to_q] == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    assert [m.key.block for m in to_q] == sorted({m.key.block for m in to_q})


def kohya_export(folder, out):
    """The same weights under kohya's names, with the alpha diffusers used (8) as '.alpha' tensors."""
    sd = load_file(folder / "pytorch_lora_weights.safetensors")
    t = {}
    for k, v in sd.items():
        stem, role = k.rsplit(".", 2)[0], k.rsplit(".", 2)[1]
        name = kohya_stem(stem)
        t[f"{name}.{'lora_down' if role == 'lora_A' else 'lora_up'}.weight"] = v
        t[f"{name}.alpha"] = torch.tensor(8.0)
    save_file(t, out, metadata={"ss_network_dim": "4", "ss_network_alpha": "8"})
    return t


def test_kohya_and_diffusers_exports_compare_with_phi_one(diffusers_lora, tmp_path):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    _, folder = diffusers_lora
    kt = kohya_export(folder, tmp_path / "kohya.safetensors")
    k = load_adapter(tmp_path / "kohya.safetensors")
    d = load_adapter(folder)
    assert k.format == "kohya"
    # the kohya → diffusers name mapping agrees with diffusers' own converter, whose output (the
    # attention-processor key generation, alphas returned apart) the diffusers reader also reads
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(kt))
    (tmp_path / "converted").mkdir()
    save_file(converted, tmp_path / "converted" / "pytorch_lora_weights.safetensors")
    theirs = load_adapter(tmp_path / "converted")
    assert set(alphas.values()) == {8.0}
    assert {m.name for m in k} == {m.name for m in theirs} == {m.name for m in d}
    for m in theirs:  # no alphas in the file: s = 1, where kohya's alpha 8 at r = 4 gives 2
        assert torch.allclose(2 * m.delta(), k[m.name].delta(), rtol=0, atol=0)
    for m in d:
        assert torch.allclose(k[m.name].delta(), m.delta(), rtol=0, atol=0)
    r = run("similarity", folder, tmp_path / "kohya.safetensors", "--json", "--dtype", "float64")
    assert r.exit_code == 0, r.output
    pair = json.loads(r.stdout)["pairs"][0]
    assert not pair["unmatched_a"] and not pair["unmatched_b"]
    phis = [m["phi"] for m in pair["modules"]]
    assert len(phis) == len(d.modules)
    # identical ΔW: φ = ‖UᵀU‖²/k = 1 up to float64 round-off in the QR/SVD (k·u ≈ 1e-15)
    assert all(abs(p - 1) < 1e-10 for p in phis), phis


# --- convert --to peft -----------------------------------------------------------------------------

def peft_deltas(model, folder):
    """ΔW of every LoRA layer after PEFT loads ``folder`` onto a float64 copy of ``model``."""
    from .peft_check import load_with_peft

    pm = load_with_peft(copy.deepcopy(model).double(), folder)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight("default").detach()
            out[name] = d.reshape(d.shape[0], -1)
    return out


def test_convert_mlx_to_peft_loads_with_identical_delta(tiny_llama, tmp_path):
    model, _ = tiny_llama
    src = tmp_path / "mlx"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(3):
        for p, out_dim in (("q_proj", 32), ("v_proj", 16)):
            t[f"model.layers.{i}.self_attn.{p}.lora_a"] = torch.randn(32, 4, generator=g)
            t[f"model.layers.{i}.self_attn.{p}.lora_b"] = torch.randn(4, out_dim, generator=g)
    save_file(t, src / "adapters.safetensors")
    (src / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 10.0}}))
    r = run("convert", src, "--to", "peft", "-o", tmp_path / "peft")
    assert r.exit_code == 0, r.output
    got = peft_deltas(model, tmp_path / "peft")
    source = load_adapter(src)
    assert sorted(got) == sorted(m.name for m in source)
    for m in source:  # float32 factors loaded into a float64 model: the same products, exactly
        assert torch.allclose(got[m.name], m.delta(), rtol=0, atol=1e-12 * float(m.delta().norm())), m.name


def test_convert_kohya_unet_to_peft_and_lokr_round_trip(diffusers_lora, tmp_path):
    unet, folder = diffusers_lora
    kohya_export(folder, tmp_path / "kohya.safetensors")
    r = run("convert", tmp_path / "kohya.safetensors", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] == [str(tmp_path / "out" / "unet")]
    got = peft_deltas(unet, tmp_path / "out" / "unet")
    source = load_adapter(tmp_path / "kohya.safetensors")
    assert sorted(f"unet.{n}" for n in got) == sorted(m.name for m in source)
    for m in source:  # includes the Conv2d resnets (lora_A written back as (r, in, 3, 3))
        ref = m.delta()
        assert torch.allclose(got[m.name.removeprefix("unet.")], ref, rtol=0, atol=1e-12 * float(ref.norm())), m.name


@pytest.mark.parametrize("config", [
    lambda: peft.LoHaConfig(r=2, alpha=4, target_modules=["conv"], init_weights=False),
    # r = 1 < max(3, 2) / 2: PEFT factors w2 (lokr_w2_a (3, 1), lokr_w2_b (1, 2·3·3)), w1 full
    lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["conv"], init_weights=False),
])
def test_peft_conv_loha_lokr_take_their_kernel_from_the_base(tmp_path, config):
    """Issue 20 #8: PEFT, like LyCORIS, stores a conv LoHa / factored-w2 LoKr 2-D (r, in·kh·kw). The module name
    'conv' is no diffusers path, so without a base nothing says it is a conv (linear, no kernel); with the base
    the layout is conv with the base weight's kernel (3, 3), it pairs with that weight, and ΔW is PEFT's."""
    from lora_lens.compare.pairing import pair_with_base
    from lora_lens.io import open_base
    from lora_lens.io.layout import with_base_layouts

    torch.manual_seed(0)
    model = Tiny()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    pm = peft.get_peft_model(model, config())
    pm.double().save_pretrained(tmp_path / "adapter")
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(t.dim() == 2 for t in stored.values()), {k: t.shape for k, t in stored.items()}  # what PEFT writes
    a = load_adapter(tmp_path / "adapter")
    assert (a["conv"].layout, a["conv"].kernel) == ("linear", ())
    placed = with_base_layouts(a, open_base(tmp_path / "model.safetensors"))
    assert (placed["conv"].layout, placed["conv"].kernel) == ("conv", (3, 3))
    assert pair_with_base(placed, open_base(tmp_path / "model.safetensors")) == {"conv": "conv.weight"}
    check_against(placed, peft_refs(pm, ["conv"]))


def test_peft_loha_factors_inside_modules_to_save_copies_are_not_modules(tmp_path):
    """The copy rule of docs/formats.md for PEFT's other tuners: LoHa factors under '<m>.modules_to_save.' or
    '<m>.original_module.' are listed as other tensors, never grouped into a module."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(Tiny(), peft.LoHaConfig(r=2, alpha=4, target_modules=["q"], init_weights=False))
    pm.double().save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    for k in list(t):  # the same factors again, as copies of a wrapped layer would be saved
        for copy in ("modules_to_save", "original_module"):
            t[k.replace(".q.", f".q.{copy}.")] = t[k].clone()
    save_file(t, f)
    a = load_adapter(tmp_path)
    assert a.names == ["q"]
    assert sum(".modules_to_save.hada_" in o.name or ".original_module.hada_" in o.name for o in a.other_tensors) == 8
    check_against(a, peft_refs(pm, ["q"]))
