"""``write_adapter`` / ``convert --to``: every format we write, read back by our readers and by the target's own loader.

References: PEFT's ``get_delta_weight`` in float64 on the models the adapters
were trained on (the source), diffusers' own loaders (``lora_state_dict`` →
``load_lora_into_unet`` / ``load_lora_into_transformer``, which convert kohya
names and alphas themselves) on float64 copies of the same tiny models, and
mlx-lm's loading rules (``linear_to_lora_layers`` + ``load_weights``)
re-stated on the Hugging Face model. Tolerance 1e-6 relative on ΔW, as the
issue asks; the float32 sources here make most paths exact to 0 or ~1e-7.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_lens.errors import ConfigError, NonFiniteError
from lora_lens.io import load_adapter, write_adapter
from lora_lens.types import Adapter

from .cli_utils import assert_bad_input, run
from .peft_check import load_with_peft

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REL = 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def clip_path(name: str) -> str:
    """transformers ≥ 5 names CLIP's modules without ``text_model.``; kohya and diffusers files keep it."""
    return name.replace("text_encoder.encoder.", "text_encoder.text_model.encoder.")


def same_deltas(got: Adapter, want: Adapter, rename=clip_path, tol: float = REL):
    assert sorted(m.name for m in got) == sorted(rename(m.name) for m in want)
    for m in want:
        assert rel(got[rename(m.name)].delta(), m.delta()) <= tol, m.name


# --- SD: a tiny UNet and CLIP text encoder with per-module ranks and scales -------------------------

def sd_models():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    return unet, te


def lora_deltas(model, component: str, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    out = {}
    for n, mod in model.named_modules():
        if hasattr(mod, "lora_A") and adapter_name in getattr(mod, "lora_A", {}):
            d = mod.get_delta_weight(adapter_name).detach()
            out[f"{component}.{n}"] = d.reshape(d.shape[0], -1)
    return out


@pytest.fixture(scope="module")
def sd_lora(tmp_path_factory):
    """A diffusers LoRA saved by diffusers: UNet (Linear + 3×3 Conv2d, ranks 4 and 2, scales 2, 4 and 0.75) and
    CLIP text encoder (r = 2, scale 2.5); returns (folder, PEFT's own float64 ΔW per module)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD
    from peft.utils import get_peft_model_state_dict

    unet, te = sd_models()
    ucfg = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                           target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"],
                           rank_pattern={"^down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 2},
                           alpha_pattern={"conv1": 3.0})
    # every Linear of CLIPAttention and CLIPMLP, as sd-scripts trains them (diffusers' kohya conversion of
    # the text encoder keys relies on out_proj being there to pick its key generation)
    tcfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
                           init_lora_weights=False)
    unet.add_adapter(ucfg)
    peft.inject_adapter_in_model(tcfg, te)  # transformers' add_adapter wants a newer PEFT than installed
    for n, p in te.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p)
    te_sd = {k.replace(".default", ""): v for k, v in te.state_dict().items() if "lora_" in k}
    folder = tmp_path_factory.mktemp("sd_lora")
    SD.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=te_sd,
                         unet_lora_adapter_metadata=ucfg.to_dict(), text_encoder_lora_adapter_metadata=tcfg.to_dict())
    refs = {**lora_deltas(copy.deepcopy(unet).double(), "unet"), **lora_deltas(copy.deepcopy(te).double(), "text_encoder")}
    return folder, refs


def diffusers_load(file) -> dict[str, torch.Tensor]:
    """ΔW of every LoRA layer after diffusers loads ``file`` onto float64 copies of the tiny models.

    The UNet goes through ``load_lora_into_unet``. The text encoder goes through diffusers'
    ``lora_state_dict`` (its kohya conversion and alphas), ``convert_state_dict_to_peft`` and
    ``_create_lora_config``, then PEFT's injection: the last step of ``load_lora_into_text_encoder``
    (transformers' ``load_adapter``) wants a newer PEFT than this environment has.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SD
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils import set_peft_model_state_dict

    unet, te = sd_models()
    unet, te = unet.double(), te.double()
    sd, alphas, meta = SD.lora_state_dict(str(file), return_lora_metadata=True)
    SD.load_lora_into_unet(sd, alphas, unet, adapter_name="x", metadata=meta)
    te_sd = {k.removeprefix("text_encoder."): v for k, v in sd.items() if k.startswith("text_encoder.")}
    te_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te_sd))
    te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}
    te_alphas = {k.removeprefix("text_encoder."): v for k, v in (alphas or {}).items() if k.startswith("text_encoder.")}
    te_meta = {k.removeprefix("text_encoder."): v for k, v in meta.items() if k.startswith("text_encoder.")} if meta else None
    rank = {k: v.shape[1] for k, v in te_sd.items() if "lora_B" in k}
    cfg = _create_lora_config(te_sd, te_alphas or None, te_meta, rank, is_unet=False)
    peft.inject_adapter_in_model(cfg, te, adapter_name="x")
    result = set_peft_model_state_dict(te, te_sd, adapter_name="x")
    assert not [k for k in result.unexpected_keys if "lora" in k], result.unexpected_keys
    return {**lora_deltas(unet, "unet", "x"), **lora_deltas(te, "text_encoder", "x")}


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_sd_lora_written_reads_back_and_diffusers_applies_the_same_delta(sd_lora, tmp_path, to):
    folder, refs = sd_lora
    source = load_adapter(folder)
    assert {(m.rank, m.scaling) for m in source} == {(4, 2.0), (2, 4.0), (4, 0.75), (2, 2.5)}
    for m in source:  # the reader agrees with PEFT itself, so the chain below starts from the truth
        assert rel(m.delta(), refs[m.name]) <= 1e-12, m.name
    (file,) = write_adapter(source, tmp_path / "out", to=to)
    back = load_adapter(tmp_path / "out")
    assert back.format == to and back.weights_file == file
    same_deltas(back, source)
    with safe_open(file, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch.float32}
        names = list(f.keys())
        meta = f.metadata()
    if to == "kohya":
        assert all(k.startswith(("lora_unet_", "lora_te_")) for k in names)
        assert "lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight" in names  # SD1.x names, sd-scripts' own
        assert "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha" in names
        assert load_file(file)["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape == (4, 8, 3, 3)
    else:
        md = json.loads(meta["lora_adapter_metadata"])
        assert md["unet.r"] == 4 and md["unet.lora_alpha"] == 8.0 and md["text_encoder.lora_alpha"] == 5.0
        assert md["unet.rank_pattern"] == {r"^down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q": 2}
    got = diffusers_load(file)
    assert sorted(got) == sorted(refs)  # module paths of the models it loaded onto
    for name, ref in refs.items():  # diffusers' own loading of our file gives PEFT's ΔW of the source
        assert rel(got[name], ref) <= REL, name


def test_kohya_to_peft_to_kohya_round_trip(sd_lora, tmp_path):
    """A kohya file named as sd-scripts names it (``lora_`` + path with dots as underscores, alpha per module)
    → PEFT folders (loaded by PEFT itself) → kohya again: the same tensors under the same names."""
    folder, refs = sd_lora
    t = {}
    for m in load_adapter(folder):
        comp, path = clip_path(m.name).split(".", 1)
        stem = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[comp] + path.replace(".", "_")
        t[f"{stem}.lora_down.weight"] = m.A.reshape(m.rank, -1, *m.kernel) if m.kernel else m.A
        t[f"{stem}.lora_up.weight"] = m.B.reshape(*m.B.shape, 1, 1) if m.kernel else m.B
        t[f"{stem}.alpha"] = torch.tensor(m.scaling * m.rank)
    save_file(t, tmp_path / "style.safetensors")
    r = run("convert", tmp_path / "style.safetensors", "--to", "peft", "-o", tmp_path / "peft", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] == [str(tmp_path / "peft" / c) for c in ("text_encoder", "unet")]
    unet, _ = sd_models()
    got = lora_deltas(load_with_peft(unet.double(), tmp_path / "peft" / "unet").base_model.model, "unet")
    assert sorted(got) == sorted(n for n in refs if n.startswith("unet."))
    for name, d in got.items():
        assert rel(d, refs[name]) <= REL, name
    # the folder of component folders converts back as one file: every key, bit for bit
    r = run("convert", tmp_path / "peft", "--to", "kohya", "-o", tmp_path / "again")
    assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "again" / "again.safetensors")
    assert sorted(back) == sorted(t)
    for k, v in t.items():  # factors bit for bit; alphas to float32's rounding of s·r
        if k.endswith(".alpha"):
            assert abs(float(back[k]) - float(v)) <= 1e-7 * float(v), k
        else:
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    r = run("convert", tmp_path / "peft", "--to", "peft", "-o", tmp_path / "peft2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["written"] == [str(tmp_path / "peft2" / c) for c in ("text_encoder", "unet")]
    # one component folder alone: its component comes from the folder's name
    r = run("convert", tmp_path / "peft" / "unet", "--to", "kohya", "-o", tmp_path / "unet-only")
    assert r.exit_code == 0, r.output
    assert sorted(load_file(tmp_path / "unet-only" / "unet-only.safetensors")) == sorted(
        k for k in t if k.startswith("lora_unet_"))


SD_SCRIPTS_FILES = {
    # SDXL: the original (SGM) UNet names, two CLIPs
    "sdxl": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (20, 12, 4.0),
             "lora_unet_output_blocks_2_0_in_layers_2": (6, 5 * 9, 1.0),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1": (16, 8, None),
             "lora_te2_text_model_encoder_layers_3_self_attn_out_proj": (8, 8, 2.0)},
    # Flux as sd-scripts names it (BFL names, fused qkv) with CLIP-L alone: still lora_te1_
    "flux": {"lora_unet_double_blocks_0_img_attn_qkv": (24, 8, 4.0),
             "lora_unet_single_blocks_1_linear1": (40, 8, 2.0),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (8, 8, 1.0)},
}


@pytest.mark.parametrize("model", sorted(SD_SCRIPTS_FILES))
def test_sd_scripts_names_round_trip_through_peft(tmp_path, model):
    """sd-scripts' own naming (SDXL's ``input_blocks``, Flux's ``double_blocks``; ``lora_te1_`` / ``lora_te2_``;
    fp16 factors and alphas; one module without alpha) → PEFT folders → kohya: the same names and factors."""
    g = torch.Generator().manual_seed(0)
    stems = SD_SCRIPTS_FILES[model]
    t = {}
    for stem, (m, n, alpha) in stems.items():
        down = torch.randn(4, n, generator=g).half()
        conv = "in_layers" in stem
        t[f"{stem}.lora_down.weight"] = down.reshape(4, 5, 3, 3) if conv else down
        t[f"{stem}.lora_up.weight"] = torch.randn(m, 4, 1, 1, generator=g).half() if conv else \
            torch.randn(m, 4, generator=g).half()
        if alpha is not None:
            t[f"{stem}.alpha"] = torch.tensor(alpha).half()
    save_file(t, tmp_path / "sd-scripts.safetensors")
    names = load_adapter(tmp_path / "sd-scripts.safetensors").names  # the original model's paths, read back
    assert {"sdxl": "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            "flux": "unet.double_blocks.0.img_attn.qkv"}[model] in names
    for args in (("--to", "peft", "-o", tmp_path / "peft"), ("--to", "kohya", "-o", tmp_path / "k")):
        r = run("convert", tmp_path / ("sd-scripts.safetensors" if args[1] == "peft" else "peft"), *args)
        assert r.exit_code == 0, r.output
    back = load_file(tmp_path / "k" / "k.safetensors")
    want = {k for k in t} | {f"{s}.alpha" for s, (_, _, a) in stems.items() if a is None}  # alpha = r written
    assert set(back) == want
    assert all(torch.equal(back[k], v) for k, v in t.items() if not k.endswith(".alpha"))
    assert {k: float(back[k]) for k in back if k.endswith(".alpha")} == {
        f"{s}.alpha": a if a is not None else 4.0 for s, (_, _, a) in stems.items()}
    same_deltas(load_adapter(tmp_path / "k"), load_adapter(tmp_path / "sd-scripts.safetensors"), rename=lambda n: n)


def test_lokr_and_dtype_written_as_plain_lora(tmp_path):
    """A LyCORIS LoKr becomes LoRA of rank r₁·r₂; --save-dtype casts the factors; ΔW is kept."""
    g = torch.Generator().manual_seed(0)
    t = {"lora_unet_mid_block_attentions_0_proj_in.lokr_w1": torch.randn(4, 2, generator=g, dtype=torch.float64),
         "lora_unet_mid_block_attentions_0_proj_in.lokr_w2_a": torch.randn(8, 3, generator=g, dtype=torch.float64),
         "lora_unet_mid_block_attentions_0_proj_in.lokr_w2_b": torch.randn(3, 16, generator=g, dtype=torch.float64),
         "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.5, dtype=torch.float64)}
    save_file(t, tmp_path / "lokr.safetensors")
    source = load_adapter(tmp_path / "lokr.safetensors")
    for to in ("kohya", "diffusers"):
        r = run("convert", tmp_path / "lokr.safetensors", "--to", to, "-o", tmp_path / to)
        assert r.exit_code == 0, r.output
        back = load_adapter(tmp_path / to)
        assert [(m.kind, m.rank, m.dtype) for m in back] == [("lora", 6, torch.float64)]
        same_deltas(back, source, tol=1e-15)
    r = run("convert", tmp_path / "lokr.safetensors", "--to", "kohya", "--save-dtype", "bfloat16", "-o", tmp_path / "bf16")
    assert r.exit_code == 0, r.output
    (m,) = load_adapter(tmp_path / "bf16")
    assert m.dtype == torch.bfloat16 and rel(m.delta(), source.modules[0].delta()) < 2e-2  # bf16: 8 bits


# --- Flux: the transformer keys ---------------------------------------------------------------------

def flux_model():
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))


def flux_lora(folder, targets: str, alpha_pattern: dict):
    from diffusers.loaders import FluxLoraLoaderMixin as FL
    from peft.utils import get_peft_model_state_dict

    t = flux_model()
    cfg = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=targets, alpha_pattern=alpha_pattern)
    t.add_adapter(cfg)
    FL.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(t),
                         transformer_lora_adapter_metadata=cfg.to_dict())
    return lora_deltas(copy.deepcopy(t).double(), "transformer")


def flux_load(file) -> dict[str, torch.Tensor]:
    from diffusers.loaders import FluxLoraLoaderMixin as FL

    sd, alphas, meta = FL.lora_state_dict(str(file), return_alphas=True, return_lora_metadata=True)
    t = flux_model().double()
    FL.load_lora_into_transformer(sd, network_alphas=alphas, transformer=t, adapter_name="x", metadata=meta)
    return lora_deltas(t, "transformer", "x")


def test_flux_transformer_kohya_and_diffusers_load_in_diffusers(tmp_path):
    """kohya ``lora_transformer_<path>`` keys (what diffusers' Flux loader converts: attention and root
    modules) and diffusers keys; a root ``proj_out`` whose scale differs from a block's ``proj_out`` keeps it
    (the ``^`` anchored alpha_pattern key)."""
    attn = r".*attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|to_add_out)|proj_out|x_embedder|context_embedder"
    refs = flux_lora(tmp_path / "src", attn, {"^proj_out": 2.0})
    source = load_adapter(tmp_path / "src")
    assert {m.scaling for m in source} == {1.5, 0.5}
    (file,) = write_adapter(source, tmp_path / "kohya", to="kohya")
    assert "lora_transformer_transformer_blocks_0_attn_to_add_out.alpha" in load_file(file)
    same_deltas(load_adapter(file), source)
    got = flux_load(file)
    assert sorted(got) == sorted(refs)
    for name, ref in refs.items():
        assert rel(got[name], ref) <= REL, name
    # every module type a Flux LoRA trains, incl. names with underscores kohya's dots-to-underscores hides
    everything = attn + r"|.*(ff|ff_context)\.net\.(0\.proj|2)|.*norm1(_context)?\.linear|.*proj_mlp|.*\.proj_out"
    refs = flux_lora(tmp_path / "src2", everything, {"^proj_out": 2.0, "^single_transformer_blocks.0.proj_out": 0.5})
    source = load_adapter(tmp_path / "src2")
    assert source["transformer.proj_out"].scaling == 0.5
    assert source["transformer.single_transformer_blocks.0.proj_out"].scaling == 0.125
    for to in ("kohya", "diffusers"):
        (file,) = write_adapter(source, tmp_path / f"all-{to}", to=to)
        same_deltas(load_adapter(file), source)
    got = flux_load(tmp_path / "all-diffusers" / "pytorch_lora_weights.safetensors")
    assert sorted(got) == sorted(refs)
    for name, ref in refs.items():
        assert rel(got[name], ref) <= REL, name
    # and PEFT: the root proj_out's alpha must not reach the single block's (an anchored alpha_pattern key)
    (peft_out,) = write_adapter(source, tmp_path / "peft", to="peft")
    got = lora_deltas(load_with_peft(flux_model().double(), peft_out).base_model.model, "transformer")
    assert sorted(got) == sorted(refs)
    for name, ref in refs.items():
        assert rel(got[name], ref) <= REL, name


def test_kohya_names_read_back_as_the_same_paths():
    """Every Linear / Conv2d path of SDXL's UNet, SD3's and Flux's transformers, CLIP and T5 text encoders:
    the kohya name written (dots → underscores) reads back as that path (names with underscores recovered)."""
    from lora_lens.keys import kohya_module_path, kohya_name

    torch.manual_seed(0)
    models = {
        "unet": diffusers.UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4, addition_embed_type="text_time",
            addition_time_embed_dim=4, projection_class_embeddings_input_dim=16, transformer_layers_per_block=(1, 2)),
        "transformer": diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            dual_attention_layers=(0,)),
        "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu")),
    }
    paths = [(c, n) for c, m in models.items() for n, mod in m.named_modules()
             if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))]
    paths += [("transformer", n) for n, mod in flux_model().named_modules() if isinstance(mod, torch.nn.Linear)]
    paths += [("text_encoder", f"text_model.{n}") for n, mod in sd_models()[1].named_modules()
              if isinstance(mod, torch.nn.Linear)]
    assert any("wi_0" in n for _, n in paths) and any("norm1_context" in n for _, n in paths)
    bad = [(c, n) for c, n in paths if kohya_module_path(kohya_name(c, n, text_encoder_prefix="lora_te1_")) != f"{c}.{n}"]
    assert not bad, bad


# --- MLX-LM --------------------------------------------------------------------------------------------

MLX_CONFIG_FIELDS = {"fine_tune_type", "num_layers", "lora_parameters"}  # what mlx-lm's load_adapters reads
MLX_LORA_FIELDS = {"rank", "scale", "dropout", "keys"}  # what linear_to_lora_layers reads


def mlx_expected_params(model, config: dict) -> dict[str, tuple[int, ...]]:
    """The parameters mlx-lm's ``load_adapters`` creates on ``model`` (a Hugging Face Llama, whose module paths
    MLX-LM shares): ``linear_to_lora_layers`` wraps, in ``model.layers[-max(num_layers, 0):]``, every module whose
    path inside the layer is in ``keys`` (and every root module whose full path is), with ``lora_a (in, r)`` and
    ``lora_b (r, out)``; ``load_weights(strict=False)`` then drops any tensor without such a parameter."""
    p = config["lora_parameters"]
    keys, r = set(p["keys"]), p["rank"]
    layers = model.model.layers
    out = {}
    chosen = list(layers)[-max(config["num_layers"], 0):]
    for i, layer in enumerate(layers):
        if layer not in chosen:
            continue
        for name, mod in layer.named_modules():
            if name in keys and isinstance(mod, torch.nn.Linear):
                out[f"model.layers.{i}.{name}.lora_a"] = (mod.in_features, r)
                out[f"model.layers.{i}.{name}.lora_b"] = (r, mod.out_features)
    for name, mod in model.named_modules():
        if name in keys and isinstance(mod, torch.nn.Linear):
            out[f"{name}.lora_a"], out[f"{name}.lora_b"] = (mod.in_features, r), (r, mod.out_features)
    return out


def test_mlx_folder_has_mlx_lm_fields_and_exact_delta(llama_adapter, tiny_llama, tmp_path):
    """Ranks 4 and 2 (zero-padded to 4), scales 2, 4 and 0.75 (folded into lora_b against the one scale 2)."""
    _, folder = llama_adapter
    model, _ = tiny_llama
    source = load_adapter(folder)
    assert {(m.rank, m.scaling) for m in source} == {(4, 2.0), (2, 4.0), (4, 0.75)}
    r = run("convert", folder, "--to", "mlx", "-o", tmp_path / "mlx")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert set(config) == MLX_CONFIG_FIELDS and set(config["lora_parameters"]) == MLX_LORA_FIELDS
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["rank"] == 4
    assert config["lora_parameters"]["scale"] == 2.0 and config["lora_parameters"]["dropout"] == 0.0
    tensors = load_file(tmp_path / "mlx" / "adapters.safetensors")
    expected = mlx_expected_params(model, config)
    assert set(tensors) <= set(expected)  # nothing that load_weights(strict=False) would silently drop
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: expected[k] for k in tensors}
    assert len(tensors) == 2 * len(source)
    for m in source:  # MLX's own formula: ΔW = scale · (lora_a · lora_b)ᵀ
        a, b = tensors[f"{m.name}.lora_a"].double(), tensors[f"{m.name}.lora_b"].double()
        assert rel(2.0 * (a @ b).T, m.delta()) <= REL, m.name
    back = load_adapter(tmp_path / "mlx")
    assert back.format == "mlx"
    same_deltas(back, source)
    # MLX → PEFT → MLX: the same tensors, bit for bit
    r = run("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "peft")
    assert r.exit_code == 0, r.output
    r = run("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx2")
    assert r.exit_code == 0, r.output
    again = load_file(tmp_path / "mlx2" / "adapters.safetensors")
    assert sorted(again) == sorted(tensors) and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert json.loads((tmp_path / "mlx2" / "adapter_config.json").read_text()) == config


def test_mlx_half_precision_and_peft_loads_converted(llama_adapter, tiny_llama, tmp_path):
    _, folder = llama_adapter
    model, _ = tiny_llama
    source = load_adapter(folder)
    (out,) = write_adapter(source, tmp_path / "mlx16", to="mlx", dtype=torch.float16)
    assert {t.dtype for t in load_file(out / "adapters.safetensors").values()} == {torch.float16}
    same_deltas(load_adapter(out), source, tol=2e-3)  # one fp16 rounding per factor
    (peft_out,) = write_adapter(load_adapter(out), tmp_path / "peft", to="peft")
    pm = load_with_peft(copy.deepcopy(model).double(), peft_out)
    got = lora_deltas(pm.base_model.model, "")
    back = load_adapter(out)
    for m in back:
        assert rel(got[f".{m.name}"], m.delta()) <= 1e-12, m.name


# --- refusals ------------------------------------------------------------------------------------------

def test_unsupported_targets_and_bad_values_exit_2(llama_adapter, sd_lora, tmp_path):
    _, folder = llama_adapter
    for to in ("kohya", "diffusers"):
        line = assert_bad_input(run("convert", folder, "--to", to, "-o", tmp_path / to), "model.layers.0",
                                "Supported:", "--to mlx")
        assert not (tmp_path / to).exists(), line
    sd_folder, _ = sd_lora
    assert_bad_input(run("convert", sd_folder, "--to", "mlx", "-o", tmp_path / "m"), "diffusion", "Supported:")
    write_adapter(load_adapter(sd_folder), tmp_path / "sd-peft", to="peft")  # its unet folder is a UNet's too
    assert_bad_input(run("convert", tmp_path / "sd-peft" / "text_encoder", "--to", "mlx", "-o", tmp_path / "m"),
                     "diffusion", "Supported:")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert_bad_input(run("convert", folder, "--to", "mlx", "-o", tmp_path / "full"), "--overwrite")
    a = load_adapter(folder)
    m = a.modules[0]
    bad = Adapter(path=a.path, settings=a.settings, modules=(type(m)(
        name=m.name, key=m.key, A=torch.full_like(m.A, float("nan")), B=m.B, alpha=m.alpha, scaling=m.scaling),))
    for to in ("peft", "mlx"):
        with pytest.raises(NonFiniteError, match=m.name):
            write_adapter(bad, tmp_path / f"nan-{to}", to=to)
        assert not (tmp_path / f"nan-{to}").exists()
    with pytest.raises(ConfigError, match="unknown"):
        write_adapter(a, tmp_path / "x", to="onnx")
    big = Adapter(path=a.path, settings=a.settings, modules=(type(m)(
        name=m.name, key=m.key, A=m.A * 1e30, B=m.B, alpha=m.alpha, scaling=m.scaling),))
    with pytest.raises(NonFiniteError, match="overflows"):
        write_adapter(big, tmp_path / "big", to="mlx", dtype=torch.float16)


# --- zero-scale modules (PEFT lora_alpha 0): a zero update must stay zero in every format -----------------

def test_mlx_zero_modal_scale_folds_nonzero_scales_exactly(llama_adapter, tmp_path):
    """Most modules at scale 0 (lora_alpha 0) and one not: MLX's one scale must be a nonzero one (the ratio
    s_i / scale is folded into lora_b); scale 0 divided the others by zero (an internal error)."""
    from dataclasses import replace

    _, folder = llama_adapter
    source = load_adapter(folder)
    mods = [replace(m, scaling=0.0, alpha=0.0) for m in source.modules[:-1]] + [source.modules[-1]]
    zeroed = replace(source, modules=tuple(mods))
    (out,) = write_adapter(zeroed, tmp_path / "mlx", to="mlx")
    assert json.loads((out / "adapter_config.json").read_text())["lora_parameters"]["scale"] == mods[-1].scaling
    back = {m.name: m.delta() for m in load_adapter(out)}
    for m in mods:
        assert rel(back[m.name], m.delta()) <= REL if m.scaling else float(back[m.name].abs().max()) == 0, m.name


def test_kohya_zero_scale_module_reads_back_as_zero(tmp_path):
    """sd-scripts (and our reader) take ``alpha = 0`` as ``alpha = rank``: a module at scale 0 written with
    ``alpha = s·r = 0`` read back at scale 1. It must read back as the zero update it is."""
    from dataclasses import replace

    g = torch.Generator().manual_seed(0)
    stems = ("lora_unet_mid_block_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out")
    t = {}
    for s in stems:
        t[f"{s}.lora_down.weight"] = torch.randn(2, 16, generator=g)
        t[f"{s}.lora_up.weight"] = torch.randn(16, 2, generator=g)
        t[f"{s}.alpha"] = torch.tensor(1.0)
    save_file(t, tmp_path / "k.safetensors")
    source = load_adapter(tmp_path / "k.safetensors")
    mods = (replace(source.modules[0], scaling=0.0, alpha=0.0), source.modules[1])
    (out,) = write_adapter(replace(source, modules=mods), tmp_path / "out", to="kohya")
    back = {m.name: m.delta() for m in load_adapter(out)}
    assert float(back[mods[0].name].abs().max()) == 0
    assert rel(back[mods[1].name], mods[1].delta()) <= REL
