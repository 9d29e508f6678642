"""Adapters in the formats people publish, built by hand from each format's documented key scheme.

Every reader is checked against a float64 ΔW materialized from the stored
tensors by the format's own formula, and its spectrum against ``svdvals`` of
that ΔW. Tolerances: the factors are exact float32 values upcast to float64,
so ΔW agrees to a few float64 round-offs (1e-12 relative); the factored SVD in
float64 agrees with a dense SVD to ~κ·u ≈ 1e-10 on these well-conditioned
random matrices.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_lens.io import load_adapter
from lora_lens.spectra import adapter_spectra

from .cli_utils import assert_bad_input, run

R64 = dict(dtype=torch.float64)


def svals(adapter):
    sp = adapter_spectra(adapter, dtype="float64", device="cpu")
    return {r.name: r.singular_values for r in sp.layers}


def check_reference(adapter, refs: dict[str, torch.Tensor]):
    """ΔW and its singular values match float64 references, module by module."""
    assert sorted(m.name for m in adapter) == sorted(refs)
    sv = svals(adapter)
    for name, ref in refs.items():
        d = adapter[name].delta()
        scale = ref.norm()
        assert torch.allclose(d, ref, atol=1e-12 * float(scale)), name
        want = torch.linalg.svdvals(ref)[: len(sv[name])]
        assert torch.allclose(sv[name].double(), want, atol=1e-10 * float(want[0])), name


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- MLX ----------------------------------------------------------------------------------------

def mlx_tensors():
    return {f"model.layers.{i}.self_attn.{p}.lora_{ab}": rnd(*(16, 4) if ab == "a" else (4, 24), seed=10 * i + j)
            for i in range(2) for j, (p, ab) in enumerate((p, ab) for p in ("q_proj", "v_proj") for ab in "ab")}


def mlx_refs(t, scale):
    return {k[: -len(".lora_a")]: scale * (t[k].double() @ t[k[:-1] + "b"].double()).T
            for k in t if k.endswith("lora_a")}


@pytest.mark.parametrize("kind", ["safetensors", "npz"])
def test_mlx_folder(tmp_path, kind):
    t = mlx_tensors()
    if kind == "safetensors":
        save_file(t, tmp_path / "adapters.safetensors")
    else:
        np.savez(tmp_path / "adapters.npz", **{k: v.numpy() for k, v in t.items()})
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0}}))
    a = load_adapter(tmp_path)
    assert a.format == "mlx" and all(m.kind == "lora" and m.rank == 4 for m in a)
    check_reference(a, mlx_refs(t, 20.0))
    r = run("inspect", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["format"] == "mlx"
    rec = d["modules"][0]
    assert {"name", "rank", "scaling", "kind", "shape", "layout"} <= set(rec) and rec["scaling"] == 20.0


def test_mlx_without_scale_is_flagged_and_dora_flagged(tmp_path):
    t = mlx_tensors()
    t["model.layers.0.self_attn.q_proj.m"] = torch.ones(24)
    save_file(t, tmp_path / "adapters.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora", "lora_parameters": {"rank": 4}}))
    a = load_adapter(tmp_path)
    assert any(f.startswith("scale-unknown") for f in a.flags) and any("DoRA" in f for f in a.flags)
    assert not a.delta_is_sBA
    check_reference(a, mlx_refs(t, 1.0))


def test_mlx_folder_without_weights_is_named_not_interrupted_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_parameters": {"rank": 4, "scale": 1.0}}))
    assert_bad_input(run("inspect", tmp_path), "MLX adapter config but no adapters.safetensors")


# --- kohya / LyCORIS ---------------------------------------------------------------------------

KOHYA_LINEAR = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
KOHYA_CONV = "lora_unet_up_blocks_1_resnets_0_conv1"
KOHYA_TE = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"


def kohya_file(path, alpha=True):
    t = {
        f"{KOHYA_LINEAR}.lora_down.weight": rnd(4, 32, seed=1), f"{KOHYA_LINEAR}.lora_up.weight": rnd(32, 4, seed=2),
        f"{KOHYA_CONV}.lora_down.weight": rnd(4, 8, 3, 3, seed=3), f"{KOHYA_CONV}.lora_up.weight": rnd(16, 4, 1, 1, seed=4),
        f"{KOHYA_TE}.lora_down.weight": rnd(2, 12, seed=5), f"{KOHYA_TE}.lora_up.weight": rnd(12, 2, seed=6),
    }
    if alpha:
        t[f"{KOHYA_LINEAR}.alpha"] = torch.tensor(2.0)
        t[f"{KOHYA_CONV}.alpha"] = torch.tensor(1.0)
    save_file(t, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "2", "ss_output_name": "toy"})
    return t


def test_kohya_linear_conv_alpha_and_metadata(tmp_path):
    f = tmp_path / "toy_lora.safetensors"
    t = kohya_file(f)
    a = load_adapter(f)
    assert a.format == "kohya" and a.metadata["ss_network_dim"] == "4"
    refs = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
            (2.0 / 4) * t[f"{KOHYA_LINEAR}.lora_up.weight"].double() @ t[f"{KOHYA_LINEAR}.lora_down.weight"].double(),
        # conv 3×3 down, 1×1 up: ΔW (out, in, 3, 3) flattened to (out, in·9)
        "unet.up_blocks.1.resnets.0.conv1": (1.0 / 4) * torch.einsum(
            "or,rikl->oikl", t[f"{KOHYA_CONV}.lora_up.weight"][:, :, 0, 0].double(),
            t[f"{KOHYA_CONV}.lora_down.weight"].double()).reshape(16, -1),
        # no alpha: alpha = r, s = 1
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj":
            t[f"{KOHYA_TE}.lora_up.weight"].double() @ t[f"{KOHYA_TE}.lora_down.weight"].double(),
    }
    check_reference(a, refs)
    assert a["unet.up_blocks.1.resnets.0.conv1"].layout == "conv"
    assert a["unet.up_blocks.1.resnets.0.conv1"].stored_as == KOHYA_CONV
    r = run("inspect", f)
    assert r.exit_code == 0 and r.output.startswith("kohya adapter") and "ss_output_name: toy" in r.output


def lokr_loha_tensors():
    """Stored as float64, so the readers' products are exact and ΔW matches the float64 reference to 1e-12
    (a float32 file rounds each product once; fp16/bf16 files are exact in float32: see
    test_lycoris_half_precision_factors_are_exact_in_float32)."""
    return {k: v.double() for k, v in {
        # LoKr: full w1 (4, 2), factored w2 = w2_a (8, 3) · w2_b (3, 16): ΔW (32, 32), rank ≤ 2·3
        "lora_unet_mid_block_attentions_0_proj_in.lokr_w1": rnd(4, 2, seed=1),
        "lora_unet_mid_block_attentions_0_proj_in.lokr_w2_a": rnd(8, 3, seed=2),
        "lora_unet_mid_block_attentions_0_proj_in.lokr_w2_b": rnd(3, 16, seed=3),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.5),
        # LoKr on a conv: w1 (2, 2) full, w2 full (4, 3, 3, 3): ΔW (8, 6·9); both full → s = 1
        "lora_unet_down_blocks_1_resnets_0_conv1.lokr_w1": rnd(2, 2, seed=4),
        "lora_unet_down_blocks_1_resnets_0_conv1.lokr_w2": rnd(4, 3, 3, 3, seed=5),
        # LoHa: (w1a w1b) ⊙ (w2a w2b), r = 3
        "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w1_a": rnd(20, 3, seed=6),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w1_b": rnd(3, 12, seed=7),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w2_a": rnd(20, 3, seed=8),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w2_b": rnd(3, 12, seed=9),
        "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha": torch.tensor(6.0),
    }.items()}


def test_lycoris_lokr_and_loha_factored(tmp_path):
    t = {k: v for k, v in lokr_loha_tensors().items()}
    f = tmp_path / "lycoris.safetensors"
    save_file(t, f)
    a = load_adapter(f)
    d = lambda k: t[k].double()  # noqa: E731
    p, c, h = ("lora_unet_mid_block_attentions_0_proj_in", "lora_unet_down_blocks_1_resnets_0_conv1",
               "lora_te_text_model_encoder_layers_1_mlp_fc1")
    refs = {
        "unet.mid_block.attentions.0.proj_in": (1.5 / 3) * torch.kron(d(f"{p}.lokr_w1"), d(f"{p}.lokr_w2_a") @ d(f"{p}.lokr_w2_b")),
        # torch's kron on the 4-D kernel (w1 as (2, 2, 1, 1)), flattened: an independent route to the conv layout
        "unet.down_blocks.1.resnets.0.conv1": torch.kron(d(f"{c}.lokr_w1")[:, :, None, None], d(f"{c}.lokr_w2")).reshape(8, -1),
        "text_encoder.text_model.encoder.layers.1.mlp.fc1":
            (6.0 / 3) * (d(f"{h}.hada_w1_a") @ d(f"{h}.hada_w1_b")) * (d(f"{h}.hada_w2_a") @ d(f"{h}.hada_w2_b")),
    }
    assert a.format == "lycoris"
    check_reference(a, refs)
    kinds = {m.name: (m.kind, m.rank) for m in a}
    assert kinds["text_encoder.text_model.encoder.layers.1.mlp.fc1"] == ("loha", 9)
    assert kinds["unet.mid_block.attentions.0.proj_in"] == ("lokr", 2 * 3)


def test_lycoris_orphan_factor_refused(tmp_path):
    t = lokr_loha_tensors()
    del t["lora_te_text_model_encoder_layers_1_mlp_fc1.hada_w2_b"]
    save_file(t, tmp_path / "broken.safetensors")
    assert_bad_input(run("spectrum", tmp_path / "broken.safetensors"), "broken.safetensors", "lacks ['hada_w2_b']")


# --- diffusers (older key generations, hand-built) ---------------------------------------------

def test_diffusers_attention_processor_and_lora_linear_layer_keys(tmp_path):
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    o = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_out_lora"
    te = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer"
    t = {f"{q}.down.weight": rnd(4, 8, seed=1), f"{q}.up.weight": rnd(8, 4, seed=2),
         f"{o}.down.weight": rnd(4, 8, seed=3), f"{o}.up.weight": rnd(8, 4, seed=4),
         f"{te}.down.weight": rnd(2, 6, seed=5), f"{te}.up.weight": rnd(6, 2, seed=6),
         "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.alpha": torch.tensor(1.0)}
    save_file(t, tmp_path / "pytorch_lora_weights.safetensors")
    a = load_adapter(tmp_path)
    assert a.format == "diffusers"
    check_reference(a, {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": t[f"{q}.up.weight"].double() @ t[f"{q}.down.weight"].double(),
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0": t[f"{o}.up.weight"].double() @ t[f"{o}.down.weight"].double(),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj": 0.5 * t[f"{te}.up.weight"].double() @ t[f"{te}.down.weight"].double(),
    })


# --- research state dicts ------------------------------------------------------------------------

def test_loralib_pt_and_nanogpt_orientation(tmp_path):
    # loralib: lora_A (r, in), lora_B (out, r), no '.weight'
    lib = {"encoder.layers.0.attn.q.lora_A": rnd(4, 10, seed=1), "encoder.layers.0.attn.q.lora_B": rnd(14, 4, seed=2)}
    torch.save(lib, tmp_path / "loralib.pt")
    a = load_adapter(tmp_path / "loralib.pt")
    assert a.format == "state_dict" and any(f.startswith("scale-unknown") for f in a.flags)
    check_reference(a, {"encoder.layers.0.attn.q": lib["encoder.layers.0.attn.q.lora_B"].double()
                        @ lib["encoder.layers.0.attn.q.lora_A"].double()})
    # nanoGPT-LoRA: x @ lora_A (in, r) @ lora_B (r, out), with the scale in a sidecar JSON
    nano = {"transformer.h.0.attn.c_attn.lora.lora_A": rnd(10, 4, seed=3),
            "transformer.h.0.attn.c_attn.lora.lora_B": rnd(4, 30, seed=4)}
    save_file(nano, tmp_path / "nano.safetensors")
    (tmp_path / "nano.json").write_text(json.dumps({"lora_alpha": 8}))
    a = load_adapter(tmp_path / "nano.safetensors")
    assert not any(f.startswith("scale-unknown") for f in a.flags)
    ref = 2.0 * (nano["transformer.h.0.attn.c_attn.lora.lora_A"].double() @ nano["transformer.h.0.attn.c_attn.lora.lora_B"].double()).T
    check_reference(a, {"transformer.h.0.attn.c_attn": ref})


def test_w_a_w_b_pairs_and_nested_dict_with_metadata(tmp_path):
    vit = {f"w_{ab}_{i:03d}": rnd(*((4, 12) if ab == "a" else (12, 4)), seed=i + (ab == "b")) for i in range(2) for ab in "ab"}
    torch.save(vit, tmp_path / "lora_vit.pth")
    a = load_adapter(tmp_path / "lora_vit.pth")
    check_reference(a, {f"{i:03d}": vit[f"w_b_{i:03d}"].double() @ vit[f"w_a_{i:03d}"].double() for i in range(2)})
    nested = {"weights": {"layer0": {"q": {"A": rnd(3, 9, seed=5), "B": rnd(7, 3, seed=6)}}},
              "metadata": {"r": 3, "alpha": 6.0}}
    torch.save(nested, tmp_path / "nested.pt")
    # 'A'/'B' alone are too common to detect on their own: --format names the reader
    a = load_adapter(tmp_path / "nested.pt", format="state_dict")
    q = nested["weights"]["layer0"]["q"]
    check_reference(a, {"layer0.q": 2.0 * q["B"].double() @ q["A"].double()})


def test_square_factors_are_flagged_ambiguous(tmp_path):
    torch.save({"m.lora_A": rnd(4, 4, seed=1), "m.lora_B": rnd(4, 4, seed=2)}, tmp_path / "sq.pt")
    a = load_adapter(tmp_path / "sq.pt")
    assert any("orientation ambiguous" in f for f in a.flags)


def test_format_override(tmp_path):
    t = mlx_tensors()
    save_file(t, tmp_path / "weights.safetensors")
    a = load_adapter(tmp_path / "weights.safetensors")
    assert a.format == "mlx"
    # read as a generic state dict instead: same ΔW (shapes decide the orientation), scale unknown
    b = load_adapter(tmp_path / "weights.safetensors", format="state_dict")
    assert b.format == "state_dict"
    check_reference(b, mlx_refs(t, 1.0))
    r = run("inspect", tmp_path / "weights.safetensors", "--format", "state_dict", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["format"] == "state_dict"


# --- detection and refusals through the CLI -------------------------------------------------------

def test_adapters_are_never_bases(tmp_path):
    f = tmp_path / "toy_lora.safetensors"
    kohya_file(f)
    r = run("inspect", f)
    assert r.exit_code == 0 and "Base checkpoint" not in r.output
    assert_bad_input(run("alignment", f, "--base", f), "kohya LoRA adapter", "not a base model")
    torch.save({"encoder.q.lora_A": rnd(2, 6), "encoder.q.lora_B": rnd(6, 2)}, tmp_path / "loralib.pt")
    assert_bad_input(run("alignment", f, "--base", tmp_path / "loralib.pt"), "state_dict LoRA adapter")
    # a base (with up/down projections that share no factor token) is still a base, refused as an adapter
    base = tmp_path / "base"
    base.mkdir()
    save_file({"model.layers.0.mlp.up_proj.weight": rnd(8, 4), "model.layers.0.mlp.down_proj.weight": rnd(4, 8),
               "unet.down_blocks.0.resnets.0.conv1.weight": rnd(4, 4, 3, 3)}, base / "model.safetensors")
    assert run("inspect", base).output.startswith("Base checkpoint")
    assert_bad_input(run("spectrum", base), "holds no adapter", "--format", "looks like a base checkpoint")


def test_a_non_adapter_that_is_no_checkpoint_is_not_called_a_base(tmp_path, adapter_copy):
    """train_log.json or an empty folder given as ADAPTER: say what it is, not 'it looks like a base checkpoint'."""
    (tmp_path / "empty").mkdir()
    line = assert_bad_input(run("spectrum", tmp_path / "empty"), "holds no adapter and no weights file")
    assert "base checkpoint" not in line and "--format" not in line
    log = adapter_copy / "train_log.json"
    log.write_text("{}")
    line = assert_bad_input(run("spectrum", log), "train_log.json: is not a weights file ('.json')", ".safetensors")
    assert "base checkpoint" not in line


def test_several_unrelated_files_refused_and_duplicates_across_shards(tmp_path):
    d = tmp_path / "loras"
    d.mkdir()
    kohya_file(d / "lora_rank4.safetensors")
    kohya_file(d / "lora_rank8.safetensors")
    for cmd in ("inspect", "spectrum"):
        assert_bad_input(run(cmd, d), "lora_rank4.safetensors", "lora_rank8.safetensors", "pick one")
    s = tmp_path / "shards"
    s.mkdir()
    for i in (1, 2):
        save_file({"layers.0.w.weight": torch.ones(2, 2)}, s / f"model-0000{i}-of-00002.safetensors")
    assert_bad_input(run("inspect", s), "layers.0.w.weight", "is in both")


@pytest.mark.parametrize("peft_type, name", [("OFT", "OFT"), ("IA3", "IA3"), ("VERA", "VeRA"),
                                             ("PROMPT_TUNING", "prompt tuning"), ("BOFT", "BOFT")])
def test_peft_tuners_that_are_not_low_rank(tmp_path, peft_type, name):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    save_file({"base_model.model.x.weight": torch.ones(2)}, tmp_path / "adapter_model.safetensors")
    assert_bad_input(run("spectrum", tmp_path), f"{name} adapter: not a low-rank update")


def test_lycoris_oft_and_ia3_files_refused(tmp_path):
    save_file({"lora_unet_x_to_q.oft_blocks": torch.ones(2, 4, 4)}, tmp_path / "oft.safetensors")
    assert_bad_input(run("inspect", tmp_path / "oft.safetensors"), "OFT adapter: not a low-rank update")
    save_file({"lora_unet_x_to_q.weight": torch.ones(4), "lora_unet_x_to_q.on_input": torch.ones(1)},
              tmp_path / "ia3.safetensors")
    assert_bad_input(run("inspect", tmp_path / "ia3.safetensors"), "IA3 adapter")


def test_kohya_orphans_and_nan_named(tmp_path):
    t = kohya_file(tmp_path / "a.safetensors")
    del t[f"{KOHYA_TE}.lora_up.weight"]
    save_file(t, tmp_path / "orphan.safetensors")
    assert_bad_input(run("inspect", tmp_path / "orphan.safetensors"), "orphan.safetensors", KOHYA_TE, "lora_up")
    t = kohya_file(tmp_path / "b.safetensors")
    t[f"{KOHYA_TE}.lora_up.weight"][0, 0] = float("nan")
    save_file(t, tmp_path / "nan.safetensors")
    assert_bad_input(run("inspect", tmp_path / "nan.safetensors"), f"{KOHYA_TE}.lora_up.weight", "NaN")


def test_convert_lycoris_to_peft_keeps_delta(tmp_path):
    """LoKr / LoHa (a conv LoKr among them) become PEFT LoRA pairs of rank r₁·r₂ with the same ΔW."""
    save_file(lokr_loha_tensors(), tmp_path / "lycoris.safetensors")
    r = run("convert", tmp_path / "lycoris.safetensors", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    source = load_adapter(tmp_path / "lycoris.safetensors")
    back = {f"{c}.{m.name}": m for c in ("unet", "text_encoder") for m in load_adapter(tmp_path / "out" / c)}
    assert sorted(back) == sorted(m.name for m in source)
    for m in source:
        assert back[m.name].kind == "lora" and back[m.name].rank == m.rank
        assert torch.allclose(back[m.name].delta(), m.delta(), rtol=0, atol=0), m.name
    assert_bad_input(run("convert", tmp_path / "lycoris.safetensors", "-o", tmp_path / "out"), "out")


# ------------------------------------------------------------- found by review after the merge (each failed before)


def test_lokr_conv_with_factored_w2_keeps_its_kernel(tmp_path):
    """A conv LoKr whose w2 is factored (w2_b (r, in, kh, kw)) is a conv module, ΔW flattened (out, in·kh·kw)."""
    s = "lora_unet_down_blocks_1_resnets_0_conv1"
    t = {f"{s}.lokr_w1": rnd(2, 2, seed=1), f"{s}.lokr_w2_a": rnd(4, 2, seed=2), f"{s}.lokr_w2_b": rnd(2, 3, 3, 3, seed=3),
         f"{s}.alpha": torch.tensor(2.0)}
    t = {k: v.double() for k, v in t.items()}  # exact products (see lokr_loha_tensors)
    save_file(t, tmp_path / "conv_lokr.safetensors")
    m = load_adapter(tmp_path / "conv_lokr.safetensors")["unet.down_blocks.1.resnets.0.conv1"]
    assert m.kernel == (3, 3) and m.layout == "conv"
    w2 = torch.einsum("or,rikl->oikl", t[f"{s}.lokr_w2_a"].double(), t[f"{s}.lokr_w2_b"].double())
    ref = (2.0 / 2) * torch.kron(t[f"{s}.lokr_w1"].double()[:, :, None, None], w2).reshape(8, -1)
    check_reference(load_adapter(tmp_path / "conv_lokr.safetensors"), {m.name: ref})


def test_kohya_alpha_that_is_not_one_number_is_named(tmp_path):
    t = kohya_file(tmp_path / "a.safetensors")
    t[f"{KOHYA_LINEAR}.alpha"] = torch.zeros(0)
    save_file(t, tmp_path / "b.safetensors")
    assert_bad_input(run("inspect", tmp_path / "b.safetensors"), f"{KOHYA_LINEAR}.alpha", "expected one number")


def test_collection_reads_other_formats_and_reduce_writes_them(tmp_path):
    t = kohya_file(tmp_path / "k1.safetensors")
    save_file({k: v * 1.5 if v.ndim else v for k, v in t.items()}, tmp_path / "k2.safetensors")
    r = run("collection", tmp_path / "k1.safetensors", tmp_path / "k2.safetensors", "-o", tmp_path / "c", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["phi"][0][1] == pytest.approx(1.0, abs=1e-6)  # a scaled copy: same subspaces
    r = run("reduce", tmp_path / "k1.safetensors", "--rank", "2", "-o", tmp_path / "r")
    assert r.exit_code == 0, r.output  # the old name of resize: a kohya file in, a kohya file out
    assert {m.rank for m in load_adapter(next((tmp_path / "r").glob("*.safetensors")))} == {2}


def test_format_forced_on_a_peft_folder_is_refused_not_ignored(llama_adapter):
    """--format kohya on a PEFT folder used to be ignored (exit 0, 'peft adapter'); --format mlx blamed an MLX config."""
    folder = llama_adapter[1]
    assert_bad_input(run("inspect", folder, "--format", "kohya"), "is a PEFT adapter folder", "drop --format")
    assert_bad_input(run("inspect", folder, "--format", "mlx"), "--format mlx", "drop --format")
    assert run("inspect", folder, "--format", "peft").exit_code == 0


def test_diffusers_processor_keys_without_prefix_are_the_unet(tmp_path):
    """UNet.save_attn_procs files have no 'unet.' prefix; they map to the same module paths as kohya and the
    prefixed generations (found by a new-user trial: similarity saw 'only in' modules that were the same)."""
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    t = {f"{q}.down.weight": rnd(4, 32, seed=1), f"{q}.up.weight": rnd(32, 4, seed=2)}
    save_file(t, tmp_path / "pytorch_lora_weights.safetensors")
    assert load_adapter(tmp_path).names == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lycoris_half_precision_factors_are_exact_in_float32(tmp_path, dtype):
    """A half-precision LoKr / LoHa file is held in float32 (not float64: 4× the memory of an fp16 SDXL LoKr,
    and not its own dtype: the products would round), and its factors are *exactly* the products of the
    stored numbers: a product of two fp16 (11-bit) or bf16 (8-bit) significands fits float32's 24 bits, and
    fp16's subnormals are normal in float32. So ΔW and its singular values equal the float64 reference up to
    float64 round-off alone (ΔW via a float64 GEMM of ≤ 9 terms, σ via a float64 SVD: 1e-13·σ₁ is generous).
    """
    t = {k: (v.to(dtype) if v.numel() > 1 else v) for k, v in lokr_loha_tensors().items()}
    f = tmp_path / "lycoris_half.safetensors"
    save_file(t, f)
    a = load_adapter(f)
    d = lambda k: t[k].double()  # noqa: E731
    p, h = "lora_unet_mid_block_attentions_0_proj_in", "lora_te_text_model_encoder_layers_1_mlp_fc1"
    w1 = d(f"{p}.lokr_w1")  # full (4, 2): W·I, so B = kron(w1, w2_a), A = kron(I, w2_b)
    exact = {  # name: (scale, B, A) from the stored numbers, float64 (exact products)
        "unet.mid_block.attentions.0.proj_in": (1.5 / 3, torch.kron(w1, d(f"{p}.lokr_w2_a")),
                                                torch.kron(torch.eye(2, dtype=torch.float64), d(f"{p}.lokr_w2_b"))),
        "text_encoder.text_model.encoder.layers.1.mlp.fc1": (
            6.0 / 3, (d(f"{h}.hada_w1_a")[:, :, None] * d(f"{h}.hada_w2_a")[:, None, :]).reshape(20, 9),
            (d(f"{h}.hada_w1_b")[:, None, :] * d(f"{h}.hada_w2_b")[None, :, :]).reshape(9, 12)),
    }
    sv = svals(a)
    for name, (s, B, A) in exact.items():
        m = a[name]
        assert m.A.dtype == m.B.dtype == torch.float32 and m.num_bytes == (A.numel() + B.numel()) * 4, name
        assert torch.equal(m.B.double(), B) and torch.equal(m.A.double(), A), name
        ref = s * B @ A
        assert torch.allclose(m.delta(), ref, rtol=0, atol=1e-14 * ref.abs().max()), name
        want = torch.linalg.svdvals(ref)[: len(sv[name])]
        assert (sv[name].double() - want).abs().max() <= 1e-13 * want[0], name


def test_an_adapter_given_as_cora_source_is_refused_with_a_hint_that_fits(tiny_llama, llama_adapter, tmp_path):
    """cora basis has no ADAPTER argument: the refusal must not tell the user to pass it as one."""
    r = run("cora", "basis", "--base", tiny_llama[1], "--source", llama_adapter[1], "--rank", 2,
            "--targets", "q_proj", "-o", tmp_path / "b")
    assert_bad_input(r, "is an adapter folder", "--source")


def lycoris_conv_tensors():
    """A LoKr with a factored w2 and a LoHa on Conv2d modules (out 8, in 6, 3×3), with the shapes LyCORIS writes
    (``LokrModule`` / ``LohaModule``, no Tucker): every factor 2-D, the kernel flattened into the columns;
    LoKr ``w1`` (2, 2) full, ``w2_a`` (4, r), ``w2_b`` (r, 3·3·3); LoHa ``hada_w*_b`` (r, 6·3·3)."""
    k, h = "lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_down_blocks_1_downsamplers_0_conv"
    return {n: v.double() for n, v in {
        f"{k}.lokr_w1": rnd(2, 2, seed=1), f"{k}.lokr_w2_a": rnd(4, 2, seed=2), f"{k}.lokr_w2_b": rnd(2, 3 * 9, seed=3),
        f"{k}.alpha": torch.tensor(1.0),
        f"{h}.hada_w1_a": rnd(8, 2, seed=4), f"{h}.hada_w1_b": rnd(2, 6 * 9, seed=5),
        f"{h}.hada_w2_a": rnd(8, 2, seed=6), f"{h}.hada_w2_b": rnd(2, 6 * 9, seed=7), f"{h}.alpha": torch.tensor(4.0),
    }.items()}


def test_lycoris_conv_loha_and_factored_lokr_are_labelled_conv(tmp_path):
    """Issue 20 #8: the 2-D factors LyCORIS writes for a conv LoKr (factored w2) and a conv LoHa read as
    ``layout: conv`` (the diffusers module path says conv; the kernel is not in the file: flagged), and with the
    base, the kernel comes from the base weight (8, 6, 3, 3). ΔW against the 4-D kernel LyCORIS rebuilds."""
    from lora_lens.io import open_base
    from lora_lens.io.layout import with_base_layouts

    t = lycoris_conv_tensors()
    save_file(t, tmp_path / "conv.safetensors")
    a = load_adapter(tmp_path / "conv.safetensors")
    k, h = "lora_unet_down_blocks_1_resnets_0_conv1", "lora_unet_down_blocks_1_downsamplers_0_conv"
    # LyCORIS: kron(w1, w2a·w2b).view(out, in, kh, kw); here kron of w1 as (2, 2, 1, 1) with w2 as (4, 3, 3, 3)
    w2 = (t[f"{k}.lokr_w2_a"] @ t[f"{k}.lokr_w2_b"]).reshape(4, 3, 3, 3)
    lokr = (1.0 / 2) * torch.kron(t[f"{k}.lokr_w1"][:, :, None, None], w2)
    loha = (4.0 / 2) * ((t[f"{h}.hada_w1_a"] @ t[f"{h}.hada_w1_b"]) * (t[f"{h}.hada_w2_a"] @ t[f"{h}.hada_w2_b"]))
    refs = {"unet.down_blocks.1.resnets.0.conv1": lokr.reshape(8, -1),
            "unet.down_blocks.1.downsamplers.0.conv": loha.reshape(8, 6, 3, 3).reshape(8, -1)}
    check_reference(a, refs)
    assert {(m.name, m.kind, m.layout, m.kernel) for m in a} == {
        ("unet.down_blocks.1.resnets.0.conv1", "lokr", "conv", ()),
        ("unet.down_blocks.1.downsamplers.0.conv", "loha", "conv", ())}
    assert sum(f.startswith("kernel-unknown: 2 conv module(s)") for f in a.flags) == 1
    r = run("inspect", tmp_path / "conv.safetensors", "--json")
    assert r.exit_code == 0, r.output
    assert {(m["layout"], tuple(m["kernel"])) for m in json.loads(r.stdout)["modules"]} == {("conv", ())}

    base = {"unet.down_blocks.1.resnets.0.conv1.weight": rnd(8, 6, 3, 3, seed=8),
            "unet.down_blocks.1.downsamplers.0.conv.weight": rnd(8, 6, 3, 3, seed=9),
            "unet.down_blocks.1.resnets.0.conv2.weight": rnd(8, 8, 3, 3, seed=10)}
    save_file(base, tmp_path / "base.safetensors")
    placed = with_base_layouts(a, open_base(tmp_path / "base.safetensors"))
    assert {(m.layout, m.kernel) for m in placed} == {("conv", (3, 3))}
    assert not any(f.startswith("kernel-unknown") for f in placed.flags)
    check_reference(placed, refs)  # the numbers do not move


# --- cloneofsimo/lora (lora_diffusion) ----------------------------------------------------------

def lora_diffusion_file(path, *, rank_meta=None):
    """A file written the way lora_diffusion's ``save_safeloras_with_embeds`` writes it: per component, metadata
    ``<comp>`` = json.dumps(list(target_replace_module)), then for each injected layer i ``<comp>:<i>:rank`` =
    str(r) with tensors ``<comp>:<i>:up`` (lora_up.weight · scale, fp16) and ``<comp>:<i>:down`` (fp16); then each
    token: metadata ``<token>`` = "<embed>", tensor ``<token>``. One ``safetensors.torch.save_file`` call.
    Eleven UNet layers (the last a Conv2d: up (8, 2, 1, 1), down (2, 4, 3, 3)), two text-encoder layers."""
    weights, metadata = {}, {}
    for comp, targets, n in (("unet", ["CrossAttention", "Attention", "GEGLU"], 11),
                             ("text_encoder", ["CLIPAttention"], 2)):
        metadata[comp] = json.dumps(targets)
        for i in range(n):
            conv = comp == "unet" and i == n - 1
            down = rnd(2, 4, 3, 3, seed=100 + i) if conv else rnd(2, 6, seed=100 + i)
            up = rnd(8, 2, 1, 1, seed=200 + i) if conv else rnd(8, 2, seed=200 + i)
            metadata[f"{comp}:{i}:rank"] = str(down.shape[0] if rank_meta is None else rank_meta)
            weights[f"{comp}:{i}:up"] = up.to(torch.float16)
            weights[f"{comp}:{i}:down"] = down.to(torch.float16)
    metadata["<s1>"] = "<embed>"
    weights["<s1>"] = rnd(6, seed=7)
    save_file(weights, path, metadata)
    return weights


def test_lora_diffusion_file_is_read_under_its_index_names(tmp_path):
    """Issue 20 #5: read as an adapter (it was called a base checkpoint): modules '<comp>:<i>', s = 1 (up already
    holds the training scale, the loader's scale is 1), ordered by index, the conv kept, the embedding apart."""
    f = tmp_path / "lora_weight.safetensors"
    w = lora_diffusion_file(f)
    header = json.loads(f.read_bytes()[8:8 + int.from_bytes(f.read_bytes()[:8], "little")])
    assert header["__metadata__"]["unet:3:rank"] == "2" and header["__metadata__"]["<s1>"] == "<embed>"
    assert "format" not in header["__metadata__"]  # save_file adds nothing: the header is what the code wrote
    a = load_adapter(f)
    assert a.format == "lora_diffusion"
    assert a.names == [f"text_encoder:{i}" for i in range(2)] + [f"unet:{i}" for i in range(11)]
    refs = {f"{c}:{i}": w[f"{c}:{i}:up"].double().reshape(8, 2) @ w[f"{c}:{i}:down"].double().reshape(2, -1)
            for c, n in (("unet", 11), ("text_encoder", 2)) for i in range(n)}
    check_reference(a, refs)
    assert {m.scaling for m in a} == {1.0} and not any(f.startswith("scale-unknown") for f in a.flags)
    assert (a["unet:10"].layout, a["unet:10"].kernel) == ("conv", (3, 3))
    assert [t.name for t in a.other_tensors] == ["<s1>"]
    assert a.metadata == {"text_encoder": '["CLIPAttention"]', "unet": '["CrossAttention", "Attention", "GEGLU"]'}
    r = run("inspect", f, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "adapter" and out["totals"]["modules"] == 13
    assert_bad_input(run("convert", f, "-o", tmp_path / "out"), "injection index")  # no module paths to target


def test_lora_diffusion_file_is_refused_as_a_base_and_its_rank_metadata_checked(tmp_path):
    from lora_lens.errors import CheckpointError
    from lora_lens.io import open_base

    lora_diffusion_file(tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match="lora_diffusion LoRA adapter"):
        open_base(tmp_path / "a.safetensors")
    lora_diffusion_file(tmp_path / "b.safetensors", rank_meta=4)
    assert_bad_input(run("spectrum", tmp_path / "b.safetensors"), "b.safetensors", "'unet:0:rank' = '4'")


@pytest.mark.parametrize("names", [("m:down", "m:up"), ("blk.0.down", "blk.0.up"), ("enc.0.A", "enc.0.B")])
def test_tensors_that_pair_as_low_rank_factors_are_never_a_base(tmp_path, names):
    """The general rule: tensors whose names differ by a factor token and whose shapes share a small rank are
    refused by name (exit 2), never described as a base checkpoint; --format state_dict reads them."""
    save_file({names[0]: rnd(2, 6, seed=1), names[1]: rnd(8, 2, seed=2), "other.weight": rnd(8, 8, seed=3)},
              tmp_path / "x.safetensors")
    assert_bad_input(run("inspect", tmp_path / "x.safetensors"), "x.safetensors", names[0], "pair up as low-rank")
    r = run("inspect", tmp_path / "x.safetensors", "--format", "state_dict", "--json")
    assert r.exit_code == 0, r.output
    assert [m["rank"] for m in json.loads(r.stdout)["modules"]] == [2]
    # the same names with full-rank shapes (a base's own weights) stay a base
    save_file({names[0]: rnd(8, 8, seed=1), names[1]: rnd(8, 8, seed=2)}, tmp_path / "y.safetensors")
    r = run("inspect", tmp_path / "y.safetensors", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["kind"] == "base", r.output
