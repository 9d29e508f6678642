"""Base checkpoints: folders, single files, shards, weights-only pickles, real weights."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens import CheckpointError, open_base
from lora_lens.inspect import inspect_path


def test_stories260k_lists_without_reading(stories_path):
    base = open_base(stories_path)
    q = base.info("model.layers.0.self_attn.q_proj.weight")
    assert q.shape == (64, 64) and q.dtype == "float32"
    groups = {g.module: g for g in base.groups()}
    assert len(groups["self_attn.k_proj"].tensors) == 5
    assert groups["self_attn.k_proj"].shapes == [(32, 64)]
    assert base.num_parameters == 260_032
    ref = load_file(str(stories_path / "model.safetensors"))
    assert torch.equal(base.get("model.layers.4.mlp.down_proj.weight"), ref["model.layers.4.mlp.down_proj.weight"])


def test_minilm_real_weights(minilm_path):
    base = open_base(minilm_path)
    names = base.names()
    assert "encoder.layer.0.attention.self.query.weight" in names  # no "bert." prefix
    info = inspect_path(minilm_path)
    groups = {g["module_type"]: g for g in info["groups"]}
    assert groups["attention.self.query"]["count"] == 6
    assert groups["attention.self.query"]["shapes"] == [[384, 384]]
    assert info["family"] == "bert"
    # an adapter on BertForSequenceClassification names "bert.encoder…": the prefix is bridged
    got = base.weight_names_for(["bert.encoder.layer.3.attention.self.value"])
    assert got == {"bert.encoder.layer.3.attention.self.value": "encoder.layer.3.attention.self.value.weight"}


def test_sharded_safetensors_with_index(tmp_path, stories_path):
    tensors = load_file(str(stories_path / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
        weight_map.update({k: fname for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    base = open_base(tmp_path)
    assert sorted(base.names()) == names
    for k in (names[0], names[-1]):
        assert torch.equal(base.get(k), tensors[k])


def test_bin_and_nested_state_dict(tmp_path):
    sd = {"layers.0.q.weight": torch.randn(4, 4), "layers.1.q.weight": torch.randn(4, 4)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    base = open_base(tmp_path)
    assert base.format == "pickle" and torch.equal(base.get("layers.1.q.weight"), sd["layers.1.q.weight"])
    torch.save({"model_state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    nested = open_base(tmp_path / "ckpt.pt")
    assert sorted(nested.names()) == sorted(sd)


def test_bf16_stays_bf16_until_compute(tmp_path):
    save_file({"a.0.w.weight": torch.randn(3, 5).bfloat16()}, str(tmp_path / "m.safetensors"))
    base = open_base(tmp_path / "m.safetensors")
    assert base.info("a.0.w.weight").dtype == "bfloat16"
    assert base.get("a.0.w.weight").dtype == torch.bfloat16


def test_adapter_folder_refused_as_base(llama_adapter):
    with pytest.raises(CheckpointError, match="adapter folder"):
        open_base(llama_adapter[1])


def test_nan_in_base_weight_is_named(tmp_path):
    from lora_lens import NonFiniteError

    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    save_file({"layers.0.q.weight": w, "layers.1.q.weight": torch.randn(4, 4)}, str(tmp_path / "model.safetensors"))
    base = open_base(tmp_path)
    assert base.info("layers.0.q.weight").shape == (4, 4)  # listing reads no data, so no error yet
    with pytest.raises(NonFiniteError, match=r"model.safetensors: tensor 'layers.0.q.weight' holds 1 NaN/Inf"):
        base.get("layers.0.q.weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_tensor_finds_every_non_finite_value_and_accepts_sums_that_overflow(dtype):
    from lora_lens import NonFiniteError
    from lora_lens.io.tensors import check_tensor

    big = torch.finfo(dtype).max
    # finite values whose sum overflows every accumulator (float32's, for the halves): refused by the fast sum,
    # accepted by the element-wise test behind it
    overflowing = torch.full((3, 5), big, dtype=dtype)
    overflowing[1] = -big  # the sum can reach +inf and -inf: inf - inf = NaN
    assert check_tensor(overflowing, "w", None) is overflowing
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (2, 4)):
            t = torch.randn(3, 5).to(dtype)
            t[where] = bad
            with pytest.raises(NonFiniteError, match="holds 1 NaN/Inf value"):
                check_tensor(t, "w", None)
    both = torch.randn(3, 5).to(dtype)
    both[0, 0], both[1, 1] = float("inf"), -float("inf")  # opposite infinities
    with pytest.raises(NonFiniteError, match="holds 2 NaN/Inf"):
        check_tensor(both, "w", None)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a.weight": "model-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-1.safetensors"):
        open_base(tmp_path)


def test_atomic_writes_leave_no_temp_and_normal_permissions(tmp_path):
    import os

    from lora_lens.io import atomic_directory, atomic_write_text

    mask = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as d:
            atomic_write_text(d / "a.txt", "x")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
        assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o644
        with pytest.raises(RuntimeError):
            with atomic_directory(tmp_path / "out2"):
                raise RuntimeError("boom")
        assert not (tmp_path / "out2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    finally:
        os.umask(mask)


def test_overwrite_never_replaces_an_input_or_the_current_folder(tmp_path, monkeypatch):
    from lora_lens import ConfigError
    from lora_lens.io import check_destination
    from lora_lens.io.atomic import register_input

    nest = tmp_path / "nest"
    (nest / "ad").mkdir(parents=True)
    (nest / "ad" / "adapter_config.json").write_text("{}")
    (nest / "notes.txt").write_text("keep me")
    register_input(nest / "ad")
    with pytest.raises(ConfigError, match="holds an input"):
        check_destination(nest, overwrite=True)
    with pytest.raises(ConfigError, match="holds an input"):
        check_destination(nest / "ad", overwrite=True)
    monkeypatch.chdir(nest)
    with pytest.raises(ConfigError, match="current folder"):
        check_destination("..", overwrite=True)
    assert (nest / "notes.txt").read_text() == "keep me"


def test_tied_lm_head_pairs_with_the_embedding(stories_path):
    base = open_base(stories_path)  # tie_word_embeddings: true, no lm_head.weight stored
    assert "lm_head.weight" not in base.names()
    got = base.weight_names_for(["lm_head", "model.layers.0.self_attn.q_proj"])
    assert got == {"lm_head": "model.embed_tokens.weight",
                   "model.layers.0.self_attn.q_proj": "model.layers.0.self_attn.q_proj.weight"}
