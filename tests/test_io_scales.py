"""Scales that the reference tools apply on reload, each checked against that tool itself.

- PEFT AdaLoRA after rank pruning: ``ranknum`` is not saved; PEFT reloads it as
  ``init_r`` (``resize_modules_by_rank_pattern``), and a module pruned to rank 0
  is a zero update. Reference: ``PeftModel.from_pretrained(...)`` then each
  layer's ``get_delta_weight`` in float64.
- diffusers: the pipeline's ``save_lora_weights`` (``unet.``-prefixed keys and
  metadata) and a model's own ``save_lora_adapter`` (unprefixed), with and
  without rsLoRA. Reference: a fresh UNet that loads the file with diffusers'
  ``load_lora_adapter``, then PEFT's ``get_delta_weight`` in float64.
- kohya / LyCORIS ``alpha = 0`` means alpha = rank (sd-scripts' and LyCORIS's
  ``alpha = dim if alpha is None or alpha == 0``): s = 1, checked against the
  float64 product of the stored factors.

Tolerance: float64 products of O(1) entries summed over ≤ 100 terms, 1e-12
relative to ‖ΔW‖ (the readers and the references do the same arithmetic).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from lora_lens.io import load_adapter
from lora_lens.io.formats.factors import SCALE_UNKNOWN

from .cli_utils import run
from .test_io_formats_ecosystem import Tiny

peft = pytest.importorskip("peft")


def assert_delta(module, ref: torch.Tensor):
    ref = ref.reshape(ref.shape[0], -1).double()
    assert torch.allclose(module.delta().double(), ref, atol=1e-12 * max(float(ref.norm()), 1.0)), module.name


# --- AdaLoRA after rank pruning ----------------------------------------------------------------

#: The allocator's keep-masks as AdaLoRA stores them in ``rank_pattern`` (``<module>.lora_E.<adapter>``):
#: q keeps 4 of init_r = 6, v keeps none, conv keeps all.
KEEP = {"q": [True, False, True, True, False, True], "v": [False] * 6, "conv": [True] * 6}


@pytest.fixture(scope="module")
def pruned_adalora(tmp_path_factory):
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=6, target_r=2, lora_alpha=3, target_modules=["q", "v", "conv"], total_step=10,
                             init_lora_weights=False)
    pm = peft.get_peft_model(Tiny(), cfg)
    for n, keep in KEEP.items():  # E as training leaves it: values, the pruned triplets zeroed by the allocator
        E = pm.base_model.model.get_submodule(n).lora_E["default"]
        torch.nn.init.normal_(E)
        with torch.no_grad():
            E.masked_fill_(~torch.tensor(keep).reshape(-1, 1), 0.0)
    pm.peft_config["default"].rank_pattern = {f"{n}.lora_E.default": keep for n, keep in KEEP.items()}
    folder = tmp_path_factory.mktemp("adalora")
    pm.double().save_pretrained(folder)  # PEFT cuts the factors to the kept rank (resize_state_dict_by_rank_pattern)
    return pm, folder


def test_pruned_adalora_reads_as_peft_reloads_it(pruned_adalora):
    trained, folder = pruned_adalora
    a = load_adapter(folder)
    assert {m.name: m.rank for m in a} == {"q": 4, "v": 0, "conv": 6}
    reloaded = peft.PeftModel.from_pretrained(Tiny(), folder).double()
    for m in a:
        layer = reloaded.base_model.model.get_submodule(m.name)
        assert float(layer.ranknum["default"]) == (0 if m.name == "v" else 6)  # PEFT's reload rule, as read here
        assert_delta(m, layer.get_delta_weight("default").detach())
        # pruning is lossless: the delta before saving (masked E, ranknum = init_r) is the same
        assert_delta(m, trained.base_model.model.get_submodule(m.name).get_delta_weight("default").detach())
    assert a["q"].scaling == pytest.approx(3 / (6 + 1e-5), rel=1e-15)  # not 3 / (4 + 1e-5): 1.5× too large
    assert a["v"].scaling == 0.0 and float(a["v"].delta().abs().sum()) == 0.0  # not α / 1e-5
    assert any("pruned 1 module(s) to rank 0 (v)" in f for f in a.flags)


def test_pruned_adalora_through_the_cli(pruned_adalora):
    _, folder = pruned_adalora
    r = run("inspect", folder, "--json")
    assert r.exit_code == 0, r.output
    mods = {m["name"]: m for m in json.loads(r.stdout)["modules"]}
    assert mods["q"]["rank"] == 4 and mods["q"]["scaling"] == pytest.approx(0.5, rel=1e-5)
    r = run("spectrum", folder)
    assert r.exit_code == 0, r.output


# --- diffusers: pipeline and model-level saves, with and without rsLoRA -------------------------

def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


@pytest.fixture(scope="module", params=[False, True], ids=["lora", "rslora"])
def diffusers_saves(request, tmp_path_factory):
    """One UNet LoRA (r = 4, alpha = 8, an alpha_pattern) saved both ways by diffusers itself."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
                          alpha_pattern={"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                          use_rslora=request.param, init_lora_weights=False)
    unet.add_adapter(cfg)
    model_level, pipeline = tmp_path_factory.mktemp("model_level"), tmp_path_factory.mktemp("pipeline")
    unet.save_lora_adapter(model_level)
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        pipeline, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=cfg.to_dict())
    return request.param, {"model": model_level, "pipeline": pipeline}


@pytest.mark.parametrize("level", ["model", "pipeline"])
def test_diffusers_saves_read_at_the_scale_diffusers_loads(diffusers_saves, level):
    rslora, folders = diffusers_saves
    folder = folders[level]
    a = load_adapter(folder)
    assert a.format == "diffusers" and not any(SCALE_UNKNOWN in f for f in a.flags)
    if level == "model":  # keys and metadata without the component prefix
        with open(folder / "pytorch_lora_weights.safetensors", "rb") as f:
            head = f.read(4096)
        assert b'"unet.' not in head and b"lora_alpha" in head
    loaded = tiny_unet()
    loaded.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors",
                             prefix=None if level == "model" else "unet", adapter_name="default")
    loaded = copy.deepcopy(loaded).double()
    for m in a:
        assert_delta(m, loaded.get_submodule(m.name.removeprefix("unet.")).get_delta_weight("default").detach())
    s = 8 / (2.0 if rslora else 4.0)
    special = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {m.scaling for m in a if m.name != special} == {s}
    assert a[special].scaling == pytest.approx(s / 4)


def test_diffusers_metadata_without_this_components_alpha_is_scale_unknown(tmp_path):
    t = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.randn(2, 8),
         "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.randn(8, 2),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 8),
         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 2)}
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.lora_alpha": 4, "unet.r": 2})}
    save_file(t, tmp_path / "pytorch_lora_weights.safetensors", metadata=meta)
    a = load_adapter(tmp_path)
    assert a["unet.down_blocks.0.attentions.0.proj_in"].scaling == 2.0
    te = a["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert te.scaling == 1.0
    assert any(f.startswith(f"{SCALE_UNKNOWN}: the file does not say the scale of 1 module") for f in a.flags)


# --- kohya / LyCORIS alpha = 0 ----------------------------------------------------------------

def test_kohya_alpha_zero_means_alpha_equals_rank(tmp_path):
    torch.manual_seed(0)
    down, up = torch.randn(4, 12, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    cdown, cup = torch.randn(3, 6, 3, 3, dtype=torch.float64), torch.randn(5, 3, 1, 1, dtype=torch.float64)
    stem, cstem = "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_conv_in"
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(0.0),
               f"{cstem}.lora_down.weight": cdown, f"{cstem}.lora_up.weight": cup, f"{cstem}.alpha": torch.tensor(0.0)},
              tmp_path / "k.safetensors", metadata={"ss_network_dim": "4", "ss_network_alpha": "0"})
    a = load_adapter(tmp_path / "k.safetensors")
    assert a.format == "kohya"
    m = a["unet.mid_block.attentions.0.proj_in"]
    assert (m.alpha, m.scaling) == (4.0, 1.0)
    assert_delta(m, up @ down)  # sd-scripts: scale = alpha / dim = 1, not a zero update
    c = a["unet.conv_in"]
    assert (c.alpha, c.scaling) == (3.0, 1.0)
    assert_delta(c, up.new_tensor(cup.reshape(5, 3) @ cdown.reshape(3, -1)))


def test_lycoris_alpha_zero_means_alpha_equals_dim(tmp_path):
    torch.manual_seed(1)
    d = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    w1a, w1b, w2a, w2b = d(10, 3), d(3, 12), d(10, 3), d(3, 12)  # LoHa, dim 3
    k1, k2a, k2b = d(2, 3), d(5, 2), d(2, 4)  # LoKr: full w1 (2, 3), w2 = w2a·w2b (5, 4), dim 2
    lh, lk = "lora_unet_mid_block_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"
    save_file({f"{lh}.hada_w1_a": w1a, f"{lh}.hada_w1_b": w1b, f"{lh}.hada_w2_a": w2a, f"{lh}.hada_w2_b": w2b,
               f"{lh}.alpha": torch.tensor(0.0),
               f"{lk}.lokr_w1": k1, f"{lk}.lokr_w2_a": k2a, f"{lk}.lokr_w2_b": k2b, f"{lk}.alpha": torch.tensor(0.0)},
              tmp_path / "l.safetensors")
    a = load_adapter(tmp_path / "l.safetensors")
    assert a.format == "lycoris"
    loha, lokr = a["unet.mid_block.attentions.0.proj_in"], a["unet.mid_block.attentions.0.proj_out"]
    assert (loha.alpha, loha.scaling, lokr.alpha, lokr.scaling) == (3.0, 1.0, 2.0, 1.0)
    assert_delta(loha, (w1a @ w1b) * (w2a @ w2b))
    assert_delta(lokr, torch.kron(k1, k2a @ k2b))


def test_model_level_save_of_a_transformer_reads_its_unprefixed_metadata(tmp_path):
    """A DiT's ``save_lora_adapter`` (keys ``transformer_blocks.…``, no component prefix), written as diffusers
    writes it: ``LoraConfig.to_dict()`` as JSON with sorted keys, sets as lists."""
    cfg = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["to_q"],
                          alpha_pattern={"transformer_blocks.1.attn.to_q": 12}).to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    g = torch.Generator().manual_seed(4)
    t = {f"transformer_blocks.{i}.attn.to_q.lora_{x}.weight": torch.randn(*s, generator=g, dtype=torch.float64)
         for i in (0, 1) for x, s in (("A", (4, 8)), ("B", (8, 4)))}
    save_file(t, tmp_path / "pytorch_lora_weights.safetensors",
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(cfg, indent=2, sort_keys=True)})
    a = load_adapter(tmp_path)
    assert a.format == "diffusers" and not any(SCALE_UNKNOWN in f for f in a.flags)
    for i, alpha in ((0, 6.0), (1, 12.0)):
        m = a[f"transformer_blocks.{i}.attn.to_q"]
        assert m.scaling == pytest.approx(alpha / 2.0, rel=1e-15)  # α / √r
        stem = f"transformer_blocks.{i}.attn.to_q"
        assert_delta(m, alpha / 2.0 * t[f"{stem}.lora_B.weight"] @ t[f"{stem}.lora_A.weight"])
