"""--dtype auto: bfloat16 autocast on a CPU with native bf16, float32 elsewhere; the run records what it used."""

import pytest
import torch

from lora_lens.train import TrainConfig, prepare, train
from lora_lens.train.config import native_bf16, resolve_train_dtype

FAST = dict(steps=2, batch_size=4, seq_len=16, eval_fraction=0.25)


def test_resolution_follows_the_probe(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for requested in ("float32", "bfloat16"):  # explicit choices are kept whatever the machine
        assert resolve_train_dtype(requested, cpu) == requested
    monkeypatch.setattr("lora_lens.train.config.native_bf16", lambda device: device.type == "cpu")
    assert resolve_train_dtype("auto", cpu) == "bfloat16"
    assert resolve_train_dtype("auto", cuda) == "float32"  # not measured on CUDA: stays float32
    monkeypatch.setattr("lora_lens.train.config.native_bf16", lambda device: False)
    assert resolve_train_dtype("auto", cpu) == "float32"


def test_probe_reads_torchs_cpu_flags(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16(torch.device("cpu")) and not native_bf16(torch.device("cuda"))
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not native_bf16(torch.device("cpu"))
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert not native_bf16(torch.device("cpu"))  # a torch without the probes: float32


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_is_resolved_once_and_recorded(monkeypatch, stories_path, tmp_path, native, expected):
    monkeypatch.setattr("lora_lens.train.config.native_bf16", lambda device: native)
    assert TrainConfig().train_dtype == "auto"  # the default
    run = prepare(stories_path, TrainConfig(device="cpu", **FAST))
    assert run.config.train_dtype == expected
    result = train(stories_path, "lora", device="cpu", out=tmp_path / "o", **FAST)
    assert result.train_dtype == expected


def test_bad_dtype_is_one_line():
    from lora_lens import ConfigError

    with pytest.raises(ConfigError, match="train_dtype \\(--dtype\\) 'float16'.*expected one of \\['auto', 'float32', 'bfloat16'\\]"):
        TrainConfig(train_dtype="float16")


def test_cli_text_output_names_the_precision_used(stories_path, tmp_path, monkeypatch):
    from .cli_utils import run

    monkeypatch.setattr("lora_lens.train.config.native_bf16", lambda device: True)
    r = run("train", "--base", str(stories_path), "--method", "lora", "--steps", "2", "--batch-size", "4",
            "--seq-len", "16", "--device", "cpu", "-o", str(tmp_path / "o"))
    assert r.exit_code == 0, r.output
    assert "lora: 2 steps in bfloat16," in r.output  # auto, resolved
    r = run("train", "--base", str(stories_path), "--method", "lora", "--steps", "2", "--batch-size", "4",
            "--seq-len", "16", "--device", "cpu", "--dtype", "float32", "-o", str(tmp_path / "o32"))
    assert r.exit_code == 0 and "lora: 2 steps in float32," in r.output
