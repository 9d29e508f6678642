"""resize: the kept ΔW is the float64 best rank-k approximation, the scale is kept, PEFT loads the result,
every format is read, LoKr/LoHa come out as LoRA, and bad input is one line with nothing written."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_lens import ConfigError, NonFiniteError, load_adapter
from lora_lens.io.peft import save_peft_adapter
from lora_lens.keys import parse_module_path
from lora_lens.ops import resize, resize_adapter
from lora_lens.types import LoraModule

from .cli_utils import assert_bad_input, assert_stamped, run
from .peft_check import load_with_peft, token_ids
from .test_io_formats import kohya_file, lokr_loha_tensors, lora_diffusion_file, mlx_tensors


def _np_sv_fro(S: np.ndarray, p: float, max_rank: int) -> int:
    """sd-scripts' index_sv_fro + 1, written again in numpy: smallest j with √(Σ_{i≤j}σ²/Σσ²) ≥ p."""
    frac = np.sqrt(np.cumsum(S ** 2) / np.sum(S ** 2))
    return max(1, min(int(np.argmax(frac >= p)) + 1, len(S), max_rank))


def _best(D: np.ndarray, k: int):
    U, S, Vh = np.linalg.svd(D, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], S


def test_sv_fro_matches_float64_reference_and_peft_loads_it(llama_adapter, tmp_path):
    pm, folder = llama_adapter
    src = load_adapter(folder)
    res = resize(folder, tmp_path / "r", method="sv_fro", param=0.9, max_rank=3, dtype="float64")
    out = load_adapter(tmp_path / "r")
    rec = {r["module"]: r for r in res.records}
    for m in src:
        D = m.delta().numpy()
        _, S = _best(D, 1)
        k = _np_sv_fro(S[: m.rank], 0.9, 3)
        Dk, _ = _best(D, k)
        got = out[m.name]
        assert got.rank == k == rec[m.name]["rank_after"]
        assert got.scaling == pytest.approx(m.scaling, rel=1e-12)  # s kept: alpha/r per module in the config
        assert np.linalg.norm(got.delta().numpy() - Dk) <= 1e-6 * np.linalg.norm(Dk)
        err = np.linalg.norm(D - Dk)
        assert rec[m.name]["fro_error"] == pytest.approx(err, rel=1e-6, abs=1e-12)
        assert rec[m.name]["fro_error_rel"] == pytest.approx(err / np.linalg.norm(D), rel=1e-6, abs=1e-12)
        assert rec[m.name]["energy_kept"] == pytest.approx(1 - (err / np.linalg.norm(D)) ** 2, abs=1e-9)
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] or cfg["r"] <= 3
    loaded = load_with_peft(pm.get_base_model(), tmp_path / "r")
    for m in src:  # PEFT's own scaling of the written config equals ours
        layer = loaded.get_submodule(f"base_model.model.{m.name}")
        assert layer.scaling["default"] == pytest.approx(m.scaling, rel=1e-6)


def test_full_rank_rslora_and_modules_to_save_reproduce_outputs(bert_adapter, tmp_path):
    bpm, folder = bert_adapter
    src = load_adapter(folder)
    assert src.settings.use_rslora
    resize(folder, tmp_path / "b", rank=64)  # above every rank: nothing dropped, rsLoRA scale kept
    out = load_adapter(tmp_path / "b")
    assert out.settings.use_rslora and out.settings.modules_to_save == ("classifier",)
    assert all(out[m.name].scaling == pytest.approx(m.scaling, rel=1e-6) for m in src)
    red = load_with_peft(bpm.get_base_model(), tmp_path / "b")
    ids = token_ids(64)
    assert torch.allclose(red(ids).logits, bpm(ids).logits, atol=1e-5)


def test_kohya_input_keeps_alpha_convention_and_writes_peft_when_asked(tmp_path):
    f = tmp_path / "k.safetensors"
    kohya_file(f)
    src = load_adapter(f)
    r = resize_adapter(src, rank=2, dtype="float64")
    for m in src:
        got = r.adapter[m.name]
        assert got.scaling == m.scaling and got.alpha == pytest.approx(m.scaling * got.rank)  # kohya: alpha = s·k
        assert got.kernel == m.kernel and got.layout == m.layout and got.stored_as == m.stored_as
        Dk, _ = _best(m.delta().numpy(), got.rank)
        assert np.linalg.norm(got.delta().numpy() - Dk) <= 1e-6 * np.linalg.norm(Dk)
    # without --to, a kohya file comes out as a kohya file, read back at the same ΔW and per-module alpha
    k = run("resize", f, "--rank", 2, "-o", tmp_path / "x", "--json")
    assert k.exit_code == 0, k.output
    (written,) = json.loads(k.stdout)["written"]
    back_k = load_adapter(written)
    assert back_k.format == "kohya"
    for m in r.adapter:
        got = back_k[m.name]
        assert got.rank == m.rank and got.scaling == pytest.approx(m.scaling)
        assert (got.delta() - m.delta()).norm() <= 1e-5 * m.delta().norm()
    res = run("resize", f, "--rank", 2, "--to", "peft", "-o", tmp_path / "p", "--json")
    assert res.exit_code == 0, res.output
    d = assert_stamped(json.loads(res.stdout), "resized_adapter")
    assert d["to"] == "peft" and sorted(d["written"]) == sorted(str(tmp_path / "p" / c) for c in ("text_encoder", "unet"))
    back = load_adapter(tmp_path / "p" / "unet")
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    want = r.adapter[f"unet.{name}"].delta()  # computed in float64 above, float32 (the default) here
    assert (back[name].delta() - want).norm() <= 1e-5 * want.norm()


def test_lokr_loha_come_out_as_plain_lora_and_the_command_says_so(tmp_path):
    f = tmp_path / "ly.safetensors"
    save_file(lokr_loha_tensors(), f)
    src = load_adapter(f)
    r = resize_adapter(src, method="energy", param=0.99, dtype="float64")
    assert {m.kind for m in src} == {"lokr", "loha"} and {m.kind for m in r.adapter} == {"lora"}
    assert r.adapter.format == "kohya" and any("LoHa/LoKr" in n and "plain" in n for n in r.notes)
    for m in src:
        D = m.delta().numpy()
        k = r.adapter[m.name].rank
        Dk, S = _best(D, k)
        assert np.sum(S[:k] ** 2) / np.sum(S ** 2) >= 0.99 - 1e-12 > np.sum(S[:k - 1] ** 2) / np.sum(S ** 2)
        assert np.linalg.norm(r.adapter[m.name].delta().numpy() - Dk) <= 1e-9 * np.linalg.norm(Dk)
    res = run("resize", f, "--method", "energy", "--param", "0.99", "--to", "peft", "-o", tmp_path / "p")
    assert res.exit_code == 0, res.output
    assert "note:" in res.stderr and "plain LoRA" in res.stderr


def test_mlx_keeps_its_one_global_scale(tmp_path):
    save_file(mlx_tensors(), tmp_path / "adapters.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "lora_parameters": {"rank": 4, "scale": 20.0}}))
    r = resize_adapter(load_adapter(tmp_path), method="sv_ratio", param=2.0, max_rank=3)
    assert {m.scaling for m in r.adapter} == {20.0} and r.adapter.format == "mlx"
    assert all(1 <= m.rank <= 3 for m in r.adapter)


@pytest.mark.parametrize("args,needles", [
    (["--rank", "0"], ["--rank 0", "≥ 1"]),
    (["--method", "sv_fro", "--param", "1.5"], ["--param 1.5", "(0, 1]"]),
    (["--method", "sv_ratio", "--param", "0.5"], ["sv_ratio", "≥ 1"]),
    (["--method", "energy"], ["needs --param"]),
    (["--rank", "2", "--method", "energy", "--param", "0.5"], ["exactly one"]),
    (["--rank", "2", "--max-rank", "0"], ["--max-rank 0"]),
    (["--rank", "2", "--param", "0.9"], ["--param 0.9 belongs to --method"]),  # was silently ignored
])
def test_bad_options_one_line_nothing_written(llama_adapter, tmp_path, args, needles):
    assert_bad_input(run("resize", llama_adapter[1], *args, "-o", tmp_path / "x"), *needles)
    assert not (tmp_path / "x").exists()


def test_nan_produced_is_refused_and_never_written(tmp_path):
    """fp16 factors whose folded √S overflow fp16: refused with one line, no folder left behind."""
    big = torch.full((64, 4), 65000.0, dtype=torch.float16)
    mods = [LoraModule("model.layers.0.q_proj", parse_module_path("model.layers.0.q_proj"), big.T.contiguous(),
                       big.clone(), alpha=4.0, scaling=1.0)]
    save_peft_adapter(tmp_path / "a", mods)
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        resize(tmp_path / "a", tmp_path / "x", rank=1)
    assert_bad_input(run("resize", tmp_path / "a", "--rank", 1, "-o", tmp_path / "x"), "NaN/Inf", "q_proj")
    assert not (tmp_path / "x").exists()


def test_library_refuses_unknown_target(llama_adapter, tmp_path):
    with pytest.raises(ConfigError, match="unknown output format"):
        resize(llama_adapter[1], tmp_path / "x", rank=1, to="onnx")


def test_folded_kernel_and_its_fallback_on_ill_conditioned_factors():
    """factored_svd_folded's first k columns are the best rank-k at the module's scale; a rank-deficient B
    (two equal columns: cond = inf) goes through the exact path and still gives the best rank-k."""
    from lora_lens.linalg import factored_svd_folded

    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(3, 40, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, 30, generator=g, dtype=torch.float64)
    s = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)
    S, Bf, Af, cond = factored_svd_folded(B, A, s)
    for i in range(3):
        D = (s[i] * B[i] @ A[i]).numpy()
        for k in (1, 3, 5):
            Dk, sv = _best(D, k)
            assert np.linalg.norm((s[i] * Bf[i, :, :k] @ Af[i, :k]).numpy() - Dk) <= 1e-10 * np.linalg.norm(Dk)
        assert np.allclose(S[i].numpy(), sv[:5], rtol=1e-12) and 1 <= float(cond[i]) < 1e3
    Bd = B[0].clone()
    Bd[:, 1] = Bd[:, 0]  # rank 4 of 5
    assert float(factored_svd_folded(Bd, A[0])[3]) > 1e12
    name = "model.layers.0.q_proj"
    mod = LoraModule(name, parse_module_path(name), A[0].float(), Bd.float(), alpha=10.0, scaling=2.0)
    from lora_lens.types import Adapter, LoraSettings

    ad = Adapter(Path("x"), LoraSettings(r=5, lora_alpha=10.0), (mod,))
    r = resize_adapter(ad, rank=3, dtype="float64")
    Dk, _ = _best(mod.delta().numpy(), 3)
    assert np.linalg.norm(r.adapter[name].delta().numpy() - Dk) <= 1e-6 * np.linalg.norm(Dk)


def test_resize_writes_mlx_through_the_format_writers(llama_adapter, tmp_path):
    """--to mlx: one global rank and scale in MLX's config; per-module ranks and scales folded by the MLX writer,
    and ΔW read back equal to the resized adapter's (float32 round-off)."""
    r = resize_adapter(load_adapter(llama_adapter[1]), rank=2)
    res = run("resize", llama_adapter[1], "--rank", 2, "--to", "mlx", "-o", tmp_path / "m", "--json")
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["lora_parameters"]["rank"] == 2
    back = load_adapter(tmp_path / "m")
    assert back.format == "mlx" and sorted(back.names) == sorted(r.adapter.names)
    for m in r.adapter:
        assert (back[m.name].delta() - m.delta()).norm() <= 1e-5 * m.delta().norm()


def test_lora_diffusion_input_refused_as_convert_refuses_it(tmp_path):
    """A lora_diffusion file names modules by injection index (unet:0): no format can name them. resize and merge
    said "--to 'lora_diffusion': unknown output format" (an option never given), and with --to peft wrote a PEFT
    folder targeting 'unet:0' that PEFT cannot load; both must refuse as convert does."""
    f = tmp_path / "ld.safetensors"
    lora_diffusion_file(f)
    for args in (("resize", f, "--rank", "1"), ("resize", f, "--rank", "1", "--to", "peft"),
                 ("merge", f, f, "--method", "cat")):
        assert_bad_input(run(*args, "-o", tmp_path / "out"), "injection index")
        assert not (tmp_path / "out").exists()
