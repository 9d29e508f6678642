"""``lora-lens spectrum``: JSON fields, tables, progress on stderr only, bad input → exit 2 with one line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens_cli.common import parse_size
from lora_lens import save_peft_adapter
from lora_lens.spectra import adapter_spectra
from lora_lens.types import LayerKey, LoraModule
from .cli_utils import assert_bad_input, run


def _strict_json(text: str) -> dict:
    def no_nan(c):
        raise AssertionError(f"non-finite number {c} in JSON")

    return json.loads(text, parse_constant=no_nan)


def test_json_fields_and_values_match_library(llama_adapter):
    folder = llama_adapter[1]
    r = run("spectrum", folder, "--json", "--device", "cpu", "--energy", "0.8")
    assert r.exit_code == 0, r.output
    assert r.stderr == ""  # few modules, not a terminal: no progress bar
    d = _strict_json(r.stdout)
    assert set(d) == {"kind", "lora_lens_version", "schema", "adapter", "settings", "conventions", "summary", "layers"}
    assert d["settings"] == {"energy_fraction": 0.8, "fro_fraction": 0.9, "device": "cpu", "dtype": "float32"}
    assert "PEFT" in d["conventions"]["rank_at_energy"] and "sv_fro" in d["conventions"]["rank_at_fro"]
    lib = adapter_spectra(folder, device="cpu", energy=0.8)
    assert [rec["name"] for rec in d["layers"]] == [rep.name for rep in lib.layers]
    for rec, rep in zip(d["layers"], lib.layers):
        for f in ("name", "block", "module_type", "rank", "scaling", "singular_values", "energy", "fro_norm",
                  "effective_rank", "stable_rank", "rank_at_energy", "rank_at_fro"):
            assert f in rec
        assert rec["singular_values"] == rep.singular_values.tolist()
        assert rec["rank_at_energy"] == rep.rank_at_energy
    q = d["summary"]["self_attn.q_proj"]
    assert q["layers"] == 3 and q["ranks"] == [2, 4] and set(q["effective_rank"]) == {"mean", "min", "max"}


def test_float64_option(gpt2_adapter):
    r32 = _strict_json(run("spectrum", gpt2_adapter[1], "--json").stdout)
    r64 = _strict_json(run("spectrum", gpt2_adapter[1], "--json", "--dtype", "float64").stdout)
    assert r64["settings"]["dtype"] == "float64"
    for a, b in zip(r32["layers"], r64["layers"]):
        assert a["singular_values"] == pytest.approx(b["singular_values"], rel=1e-5)


def test_table_and_per_layer_rows(llama_adapter):
    r = run("spectrum", llama_adapter[1], "--layers")
    assert r.exit_code == 0, r.output
    for needle in ("self_attn.q_proj", "mlp.down_proj", "eff. rank", "r@90% energy", "model.layers.2.self_attn.v_proj"):
        assert needle in r.stdout


def test_zero_adapter_prints_note_and_no_nan(tiny_llama, tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    pm = peft.get_peft_model(copy.deepcopy(tiny_llama[0]), peft.LoraConfig(r=4, target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path)
    r = run("spectrum", tmp_path)
    assert r.exit_code == 0 and "zero update" in r.stdout and "nan" not in r.stdout.lower()
    d = _strict_json(run("spectrum", tmp_path, "--json").stdout)
    assert all(rec["effective_rank"] == 0 and rec["rank_at_energy"] == 0 for rec in d["layers"])


def test_nan_adapter_exits_2_naming_the_tensor(adapter_copy):
    f = adapter_copy / "adapter_model.safetensors"
    sd = load_file(str(f))
    key = "base_model.model.model.layers.2.mlp.down_proj.lora_A.weight"
    sd[key] = sd[key].clone()
    sd[key][1, 1] = float("nan")
    save_file(sd, str(f), metadata={"format": "pt"})
    assert_bad_input(run("spectrum", adapter_copy, "--json"), key, "NaN/Inf")


def test_bad_options_exit_2(llama_adapter, tmp_path):
    assert_bad_input(run("spectrum", llama_adapter[1], "--energy", "1.5"), "fraction")
    assert_bad_input(run("spectrum", tmp_path / "missing"), "no such file")
    if not torch.cuda.is_available():
        assert_bad_input(run("spectrum", llama_adapter[1], "--device", "cuda"), "no CUDA device")
    r = run("spectrum", llama_adapter[1], "--max-memory", "lots")
    assert r.exit_code == 2 and "not a size" in r.stderr and "Traceback" not in r.output
    r = run("spectrum", llama_adapter[1], "--adapter", "nope")
    assert_bad_input(r, "no adapter named 'nope'")


def test_max_memory_and_named_adapters(tmp_path):
    gen = torch.Generator().manual_seed(0)

    def mods(n_blocks, seed_shift):
        return [LoraModule(f"model.layers.{b}.self_attn.q_proj", LayerKey("model.layers", b, "self_attn.q_proj"),
                           torch.randn(2, 6, generator=gen) + seed_shift, torch.randn(8, 2, generator=gen), 4.0, 2.0)
                for b in range(n_blocks)]

    save_peft_adapter(tmp_path / "runs" / "seed1", mods(120, 0.0))
    save_peft_adapter(tmp_path / "runs" / "seed2", mods(3, 1.0))
    r = run("spectrum", tmp_path / "runs", "--adapter", "seed1", "--json", "--max-memory", "512B")
    assert r.exit_code == 0, r.output
    d = _strict_json(r.stdout)  # stdout is exactly one JSON object although a progress label went to stderr
    assert len(d["layers"]) == 120 and d["adapter"]["label"] == "seed1"
    assert "decomposing LoRA modules" in r.stderr  # ≥ 100 modules: progress shown even when not a terminal
    assert_bad_input(run("spectrum", tmp_path / "runs"), "several named adapters")


def test_parse_size():
    assert parse_size("2GB") == 2 * 10 ** 9 and parse_size("512MiB") == 512 * 2 ** 20
    assert parse_size("1.5gib") == int(1.5 * 2 ** 30) and parse_size("4096") == 4096 and parse_size("3k") == 3000
    for bad in ("", "lots", "2 parsecs", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_help_has_example():
    r = run("spectrum", "--help")
    assert r.exit_code == 0 and "Examples" in r.output and "--max-memory" in r.output


def test_progress_bar_on_a_terminal_goes_to_stderr_only(llama_adapter, monkeypatch):
    import lora_lens_cli.common

    monkeypatch.setattr(lora_lens_cli.common, "_isatty", lambda stream: True)  # 9 modules: shown only on a terminal
    r = run("spectrum", llama_adapter[1], "--json")
    assert r.exit_code == 0, r.output
    assert "decomposing LoRA modules" in r.stderr  # click itself draws the bar only on a real terminal
    _strict_json(r.stdout)
