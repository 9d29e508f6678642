"""lora-lens extract: a planted low-rank fine-tune of real MiniLM comes back through PEFT itself, energy and
residual equal a float64 numpy SVD, the Conv1D layout (tiny GPT-2), bf16 inputs, Dask's numbers, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens.errors import ConfigError, KeyMatchError, NonFiniteError, ShapeError
from lora_lens.ops import select_rank
from lora_lens.ops.extract import extract_lora

from .cli_utils import assert_bad_input, run

PLANTED_RANK = 3


def _tuned(src, dst, change, seed=0):
    """A copy of the checkpoint folder ``src`` at ``dst`` whose tensors ``change(name, W, gen)`` returns."""
    shutil.copytree(src, dst)
    f = next(p for p in dst.iterdir() if p.suffix == ".safetensors")
    sd = load_file(f)
    g = torch.Generator().manual_seed(seed)
    save_file({n: change(n, W, g) for n, W in sd.items()}, str(f), metadata={"format": "pt"})
    return dst, sd, load_file(f)


def _plant(names, rank=PLANTED_RANK, noise=0.0, bias=()):
    def change(n, W, g):
        if n.endswith(names) and W.dim() == 2:
            m, k = W.shape
            W = W + 0.05 * torch.randn(m, rank, generator=g) @ torch.randn(rank, k, generator=g) / k ** 0.5
            return W + noise * torch.randn(m, k, generator=g) if noise else W
        if n in bias:
            return W + 0.1
        return W
    return change


@pytest.fixture(scope="module")
def minilm_tuned(minilm_path, tmp_path_factory):
    """MiniLM with a planted rank-3 change in every query and value weight, and a changed LayerNorm."""
    return _tuned(minilm_path, tmp_path_factory.mktemp("ex") / "tuned",
                  _plant(("query.weight", "value.weight"), bias=("encoder.layer.0.output.LayerNorm.bias",)))


def test_planted_change_comes_back_through_peft(minilm_path, minilm_tuned, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tuned, _, after = minilm_tuned
    res = extract_lora(minilm_path, tuned, tmp_path / "lora", rank=8, targets="query,value", dtype="float64")
    assert len([m for m in res.modules if m.rank]) == 12 and res.modules_to_save == ("encoder.layer.0.output.LayerNorm",)
    for m in res.modules:  # rank 8 ≥ the planted 3: all energy kept, σ_4.. are only float32 storage rounding
        assert m.rank == 8 and m.energy_kept == pytest.approx(1, abs=1e-10) and m.residual < 2e-6 * m.norm
        assert max(m.sigma[PLANTED_RANK:]) < 1e-6 * m.sigma[0]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["modules_to_save"] == ["encoder.layer.0.output.LayerNorm"]
    model = transformers.AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "lora").merge_and_unload().state_dict()
    checked = 0
    for n, W in after.items():
        if n not in merged:
            continue
        scale = float(W.abs().max()) + 1
        # stored in float32: the merged weight is W_base + B A rounded once more
        assert float((merged[n].double() - W.double()).abs().max()) <= 4e-7 * scale, n
        checked += 1
    assert checked >= 100


def test_energy_and_residual_equal_a_float64_svd(minilm_path, tmp_path):
    tuned, before, after = _tuned(minilm_path, tmp_path / "t", _plant(("value.weight",), rank=6, noise=1e-3))
    w = "encoder.layer.2.attention.self.value.weight"
    D = (after[w].double() - before[w].double()).numpy()
    s = np.linalg.svd(D, compute_uv=False)
    for kw in (dict(rank=4), dict(method="sv_fro", param=0.97, max_rank=32),
               dict(method="energy", param=0.9, max_rank=32), dict(method="sv_ratio", param=20, max_rank=32)):
        res = extract_lora(minilm_path, tuned, None, targets="value", dtype="float64", n_iter=6, **kw)
        m = next(x for x in res.modules if x.weight == w)
        j = 4 if "rank" in kw else select_rank(torch.from_numpy(s), kw["method"], kw["param"], max_rank=32)
        assert m.rank == j, kw
        assert m.norm == pytest.approx(np.linalg.norm(D), rel=1e-12)
        assert m.energy_kept == pytest.approx((s[:j] ** 2).sum() / (s ** 2).sum(), rel=1e-8)
        assert m.residual == pytest.approx(np.sqrt((s[j:] ** 2).sum()), rel=1e-6)
        np.testing.assert_allclose((m.B.double() @ m.A.double()).numpy(), _truncated(D, j), atol=1e-7 * s[0])


def _truncated(D, j):
    U, s, Vt = np.linalg.svd(D, full_matrices=False)
    return (U[:, :j] * s[:j]) @ Vt[:j]


def test_conv1d_and_bf16_inputs(tiny_gpt2, tmp_path):
    """GPT-2's Conv1D weights are stored (in, out): the adapter is in PEFT's layout and loads back; both
    checkpoints in bf16, the difference taken in float32."""
    peft = pytest.importorskip("peft")
    model, folder = tiny_gpt2
    base = tmp_path / "base"
    shutil.copytree(folder, base)
    f = base / "model.safetensors"
    save_file({n: W.bfloat16() for n, W in load_file(f).items()}, str(f), metadata={"format": "pt"})
    tuned, before, after = _tuned(base, tmp_path / "tuned", lambda n, W, g: (W.float() + (
        0.1 * torch.randn(W.shape[0], 2, generator=g) @ torch.randn(2, W.shape[1], generator=g)
        if n.endswith("attn.c_attn.weight") else 0)).bfloat16())
    res = extract_lora(base, tuned, tmp_path / "lora", rank=4, targets="c_attn")
    assert {m.layout for m in res.modules} == {"conv1d"} and all(m.rank == 4 for m in res.modules)
    factors = {m.weight: m for m in res.modules}
    pm = peft.PeftModel.from_pretrained(model.__class__.from_pretrained(base, dtype=torch.float32), tmp_path / "lora")
    seen = 0
    for n, mod in pm.named_modules():
        if n.endswith("attn.c_attn") and hasattr(mod, "get_delta_weight"):
            w = n.removeprefix("base_model.model.") + ".weight"
            want = after[w].float() - before[w].float()  # the stored (in, out) layout
            ours = (factors[w].B @ factors[w].A).T  # ΔW_4 in PyTorch's (out, in) layout, transposed back
            # the planted rank-2 change plus bf16 rounding of the tuned weights: ΔW_4 is its best rank-4 approximation
            assert float((ours - want).norm()) <= 1.001 * float(torch.linalg.svdvals(want)[4:].norm())
            got = mod.get_delta_weight("default")  # what PEFT applies: the factors as written, in bf16
            assert got.shape == want.shape and float((got - ours).norm()) <= 2 ** -7 * float(ours.norm())
            seen += 1
    assert seen == 2


def test_dask_local_cluster_gives_the_in_process_numbers(minilm_path, minilm_tuned):
    pytest.importorskip("distributed")
    from lora_lens.dist import dask_mapper

    tuned = minilm_tuned[0]
    ref = extract_lora(minilm_path, tuned, None, rank=4, targets="query", max_memory=1 << 20)
    with dask_mapper("local", workers=2, processes=False) as mapper:
        got = extract_lora(minilm_path, tuned, None, rank=4, targets="query", max_memory=1 << 20, mapper=mapper)
    for a, b in zip(ref.modules, got.modules):
        assert a.weight == b.weight and a.sigma == b.sigma and a.residual == b.residual
        assert torch.equal(a.B, b.B) and torch.equal(a.A, b.A)


def test_refusals(minilm_path, minilm_tuned, tmp_path):
    tuned = minilm_tuned[0]
    with pytest.raises(ConfigError, match="equals --base"):
        extract_lora(minilm_path, minilm_path, None, rank=4)
    with pytest.raises(ConfigError, match="both given"):
        extract_lora(minilm_path, tuned, None, rank=4, method="sv_fro", param=0.9)
    with pytest.raises(ConfigError, match="must be in"):
        extract_lora(minilm_path, tuned, None, method="energy", param=1.5)
    with pytest.raises(KeyMatchError, match="unknown target"):
        extract_lora(minilm_path, tuned, None, rank=4, targets="q_proj")
    other, _, _ = _tuned(minilm_path, tmp_path / "other", lambda n, W, g: W[:-1] if n.endswith("pooler.dense.weight")
                         else W)
    with pytest.raises(ConfigError, match="no target weight changed"):  # only a LayerNorm changed in query's run
        extract_lora(minilm_path, tuned, tmp_path / "none", rank=4, targets="key")
    with pytest.raises(ShapeError, match="pooler.dense.weight"):
        extract_lora(minilm_path, other, None, rank=4)
    nan, _, _ = _tuned(minilm_path, tmp_path / "nan", lambda n, W, g: W.index_put((torch.tensor([0]),), torch.tensor(
        float("nan"))) if n.endswith("layer.1.attention.self.query.weight") else W)
    with pytest.raises(NonFiniteError, match="layer.1.attention.self.query.weight"):
        extract_lora(minilm_path, nan, tmp_path / "nan-out", rank=4)
    assert not (tmp_path / "nan-out").exists()


def test_cli_extract_and_bad_input(minilm_path, minilm_tuned, tmp_path):
    tuned = minilm_tuned[0]
    r = run("extract", "--base", minilm_path, "--tuned", tuned, "--rank", 4, "--targets", "query,value",
            "-o", tmp_path / "out", "--json", "-q")
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert obj["kind"] == "extraction" and len(obj["modules"]) == 12 and obj["modules"][0]["rank"] == 4
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["encoder.layer.0.output.LayerNorm"]  # the changed LayerNorm, copied whole
    r = run("extract", "--base", minilm_path, "--tuned", tuned, "--rank", 4, "--targets", "query,value",
            "--no-modules-to-save", "-o", tmp_path / "bare", "-q")
    assert r.exit_code == 0, r.output
    assert not json.loads((tmp_path / "bare" / "adapter_config.json").read_text()).get("modules_to_save")
    assert all(".lora_" in k for k in load_file(tmp_path / "bare" / "adapter_model.safetensors"))  # no copies
    assert_bad_input(run("extract", "--base", minilm_path, "--tuned", minilm_path, "--rank", 4, "-o", tmp_path / "o2"),
                     "equals --base")
    assert not (tmp_path / "o2").exists() or not any((tmp_path / "o2").iterdir())
    assert_bad_input(run("extract", "--base", minilm_path, "--tuned", tuned, "--method", "sv_fro", "--param", 2,
                         "-o", tmp_path / "o3"), "--param 2")
    assert_bad_input(run("extract", "--base", minilm_path, "--tuned", tuned, "-o", tmp_path / "o4"), "--rank")


def test_embeddings_as_lora_or_modules_to_save(minilm_path, tmp_path):
    """A changed word embedding: a LoRA with --embeddings (PEFT's lora_embedding_A/B), else a modules_to_save copy;
    PEFT applies either to the same weights."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    w = "embeddings.word_embeddings.weight"
    tuned, _, after = _tuned(minilm_path, tmp_path / "t", _plant(("word_embeddings.weight", "layer.0.attention.self"
                                                                                           ".query.weight"), rank=2))
    for emb in (True, False):
        out = tmp_path / f"lora{emb}"
        res = extract_lora(minilm_path, tuned, out, rank=2, embeddings=emb, dtype="float64")
        assert [m.layout for m in res.modules if m.rank] == (["embedding"] if emb else []) + ["linear"]
        assert res.modules_to_save == (() if emb else ("embeddings.word_embeddings",))
        model = transformers.AutoModel.from_pretrained(minilm_path, dtype=torch.float32)
        merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
        assert float((merged[w].double() - after[w].double()).abs().max()) <= 4e-7 * float(after[w].abs().max()), emb
