"""merge: cat is exactly Σ wᵢΔWᵢ, svd is its float64 best rank-R approximation and equals PEFT's
add_weighted_adapter("svd"), ties / magnitude_prune / dare_* equal PEFT's *_svd (DARE with PEFT's RNG matched
on one module), module sets are united, bad input is one line with nothing written."""

import copy
import json

import numpy as np
import pytest
import torch

from lora_lens import ConfigError, NonFiniteError, ShapeError, load_adapter
from lora_lens.compute import item_seed
from lora_lens.io.peft import save_peft_adapter
from lora_lens.keys import parse_module_path
from lora_lens.ops import merge, merge_adapters
from lora_lens.ops.merge import anchor_merge
from lora_lens.types import LoraModule

from .adapter_utils import make_peft_adapter
from .cli_utils import assert_bad_input, assert_stamped, run
from .peft_check import load_with_peft

W = [0.7, -0.3]


@pytest.fixture(scope="module")
def second_adapter(tiny_llama, tmp_path_factory):
    """Another adapter on tiny Llama: other rank and alpha, k_proj that the first lacks, no down_proj."""
    model, _ = tiny_llama
    folder = tmp_path_factory.mktemp("second_adapter")
    make_peft_adapter(model, folder, seed=5, r=3, lora_alpha=5, target_modules=["q_proj", "k_proj", "v_proj"])
    return folder


def _reference(adapters, weights):
    """Σ wᵢ ΔWᵢ in float64 over the union of modules."""
    ref = {}
    for ad, w in zip(adapters, weights):
        for m in ad:
            ref[m.name] = ref.get(m.name, 0) + w * m.delta(torch.float64).numpy()
    return ref


def _rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_cat_is_exact_and_svd_is_the_best_rank_r(llama_adapter, second_adapter, tmp_path):
    a, b = load_adapter(llama_adapter[1]), load_adapter(second_adapter)
    ref = _reference([a, b], W)
    cat = merge_adapters([a, b], W, method="cat")
    assert set(cat.adapter.names) == set(ref) and any("missing from some" in n for n in cat.notes)
    for name, D in ref.items():
        m = cat.adapter[name]
        assert m.rank == sum(ad[name].rank for ad in (a, b) if name in ad.names) and m.scaling == 1.0
        assert _rel(m.delta().numpy(), D) < 1e-6  # float32 factors: one rounding each
    full = merge_adapters([a, b], W, method="svd", rank=64, dtype="float64")
    for name, D in ref.items():
        assert _rel(full.adapter[name].delta().numpy(), D) < 1e-6
    svd = merge_adapters([a, b], W, method="svd", rank=2, dtype="float64")
    rec = {r["module"]: r for r in svd.records}
    for name, D in ref.items():
        U, S, Vh = np.linalg.svd(D, full_matrices=False)
        D2 = (U[:, :2] * S[:2]) @ Vh[:2]
        assert svd.adapter[name].rank == 2 and _rel(svd.adapter[name].delta().numpy(), D2) < 1e-6
        assert rec[name]["fro_error"] == pytest.approx(np.sqrt(np.sum(S[2:] ** 2)), rel=1e-6)
    default = merge_adapters([a, b], W, method="svd")
    assert max(m.rank for m in default.adapter) == max(m.rank for ad in (a, b) for m in ad)  # R = largest input rank


def _peft_model_with(model, folders):
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        pm.load_adapter(str(f), adapter_name=f"a{i}")
    return pm


def _peft_deltas(pm, names, adapter):
    out = {}
    for name in names:
        layer = pm.get_submodule(f"base_model.model.{name}")
        if adapter in layer.lora_A:
            d = layer.get_delta_weight(adapter).double()
            out[name] = (d.T if getattr(layer, "fan_in_fan_out", False) else d).numpy()
    return out


@pytest.mark.parametrize("method", ["svd", "ties_svd", "magnitude_prune_svd"])
def test_equals_peft_add_weighted_adapter(tiny_llama, llama_adapter, second_adapter, tmp_path, method):
    model, _ = tiny_llama
    pm = _peft_model_with(model, [llama_adapter[1], second_adapter])
    kw = {} if method == "svd" else {"density": 0.4}
    pm.add_weighted_adapter(["a0", "a1"], W, "m", combination_type=method, svd_rank=3, **kw)
    ours = merge([llama_adapter[1], second_adapter], tmp_path / "m", weights=W, method=method.removesuffix("_svd"),
                 rank=3, **kw)
    back = load_adapter(tmp_path / "m")
    theirs = _peft_deltas(pm, back.names, "m")
    assert set(theirs) == set(back.names)
    for name, D in theirs.items():
        assert _rel(back[name].delta().numpy(), D) <= 1e-5, name
    assert_stamped(ours.to_dict(), "merged_adapter")
    load_with_peft(model, tmp_path / "m")


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_with_its_rng_matched_on_one_module(tiny_llama, tmp_path, monkeypatch, method):
    """PEFT draws its Bernoulli masks from the global RNG, after the new adapter's init has drawn from it too;
    ours are seeded per module. On a one-module adapter, seeding the global RNG with that module's seed right
    before PEFT's own dare_* runs makes the draws the same (PEFT's maths untouched)."""
    model, _ = tiny_llama
    name = "model.layers.1.self_attn.q_proj"
    folders = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 3)]):
        folders.append(tmp_path / f"a{i}")
        make_peft_adapter(model, folders[-1], seed=10 + i, r=r, lora_alpha=alpha, target_modules=[name])
    pm = _peft_model_with(model, folders)
    lora_model = pytest.importorskip("peft.tuners.lora.model")
    peft_dare = getattr(lora_model, method)

    def seeded(*args, **kwargs):
        torch.manual_seed(item_seed(7, name))
        return peft_dare(*args, **kwargs)

    monkeypatch.setattr(lora_model, method, seeded)
    pm.add_weighted_adapter(["a0", "a1"], W, "m", combination_type=f"{method}_svd", svd_rank=4, density=0.5)
    res = merge_adapters([load_adapter(f) for f in folders], W, method=method, rank=4, density=0.5, seed=7)
    D = _peft_deltas(pm, [name], "m")[name]
    assert _rel(res.adapter[name].delta().numpy(), D) <= 1e-5
    other = merge_adapters([load_adapter(f) for f in folders], W, method=method, rank=4, density=0.5, seed=8)
    assert _rel(other.adapter[name].delta().numpy(), D) > 1e-2  # the seed matters


def test_anchor_maths_against_float64_numpy():
    """TIES on a hand-checked stack: magnitude pruning, sign elected on the unweighted sum, disjoint mean."""
    d1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]], dtype=torch.float64)
    d2 = torch.tensor([[-2.5, -4.0], [1.0, -0.1]], dtype=torch.float64)
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    # density 0.5 keeps 2 of 4 entries: d1 → [[3, 0], [0, 2]], d2 → [[-2.5, -4], [0, 0]]
    # unweighted sums [[0.5, -4], [0, 2]] elect +, −, + (0 counts as +), +; only same-sign survivors are averaged
    ties = anchor_merge([d1, d2], w, "ties", 0.5, "total", g)
    assert torch.equal(ties, torch.tensor([[6.0, -4.0], [0.0, 4.0]], dtype=torch.float64))
    mp = anchor_merge([d1, d2], w, "magnitude_prune", 0.5, "total", g)
    assert torch.equal(mp, torch.tensor([[3.5, -4.0], [0.0, 4.0]], dtype=torch.float64))
    full = anchor_merge([d1, d2], w, "magnitude_prune", 1.0, "total", g)
    assert torch.equal(full, 2 * d1 + d2)  # density 1: no pruning, the plain weighted sum


def test_cli_merge_svd_json_and_cat(llama_adapter, second_adapter, tmp_path):
    r = run("merge", llama_adapter[1], second_adapter, "--weights", "0.7,0.3", "--method", "svd", "--rank", 2,
            "-o", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    d = assert_stamped(json.loads(r.stdout), "merged_adapter")
    assert d["summary"]["rank"] == 2 and {rec["rank_after"] for rec in d["records"]} == {2}
    assert "note:" in r.stderr and "missing from some" in r.stderr
    r = run("merge", llama_adapter[1], second_adapter, "--weights", "0.7,0.3", "--method", "cat", "-o", tmp_path / "c")
    assert r.exit_code == 0, r.output
    ref = _reference([load_adapter(llama_adapter[1]), load_adapter(second_adapter)], [0.7, 0.3])
    back = load_adapter(tmp_path / "c")
    assert all(_rel(back[n].delta().numpy(), D) < 1e-6 for n, D in ref.items())


@pytest.mark.parametrize("args,needles", [
    (["--weights", "0.5"], ["--weights has 1 value(s) for 2 adapter(s)"]),
    (["--rank", "0"], ["--rank 0"]),
    (["--method", "ties"], ["needs --density"]),
    (["--method", "dare_ties", "--density", "1.5"], ["--density 1.5", "(0, 1]"]),
    (["--method", "cat", "--rank", "4"], ["cat keeps every direction"]),
    (["--weights", "a,b"], ["--weights"]),
])
def test_bad_options_one_line_nothing_written(llama_adapter, second_adapter, tmp_path, args, needles):
    assert_bad_input(run("merge", llama_adapter[1], second_adapter, *args, "-o", tmp_path / "x"), *needles)
    assert not (tmp_path / "x").exists()


def _one(folder, n, value=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(n)
    A = torch.randn(2, n, generator=g) if value is None else torch.full((2, n), value)
    B = torch.randn(16, 2, generator=g) if value is None else torch.full((16, 2), value)
    name = "model.layers.0.self_attn.q_proj"
    save_peft_adapter(folder, [LoraModule(name, parse_module_path(name), A.to(dtype), B.to(dtype), 2.0, 1.0)])
    return folder


def test_shape_mismatch_and_nan_refused(tmp_path):
    a, b = _one(tmp_path / "a", 8), _one(tmp_path / "b", 12)
    assert_bad_input(run("merge", a, b, "-o", tmp_path / "x"), "q_proj", "(16, 8)", "(16, 12)")
    with pytest.raises(ShapeError):
        merge([a, b], tmp_path / "x")
    c = _one(tmp_path / "c", 8, value=60000.0, dtype=torch.float16)  # wᵢsᵢBᵢ overflows fp16 in the cat factors
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        merge([c, c], tmp_path / "x", weights=[4.0, 4.0], method="cat")
    assert_bad_input(run("merge", c, c, "--weights", "4,4", "--method", "cat", "-o", tmp_path / "x"), "NaN/Inf")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="one weight per adapter"):
        merge_adapters([load_adapter(a)], [1.0, 2.0])


def test_merge_and_resize_refuse_to_overwrite_an_input(llama_adapter, second_adapter, tmp_path):
    import shutil

    a = tmp_path / "a"
    shutil.copytree(llama_adapter[1], a)
    before = (a / "adapter_model.safetensors").read_bytes()
    for args in (["merge", a, second_adapter, "--method", "cat"], ["resize", a, "--rank", "1"]):
        assert_bad_input(run(*args, "-o", a, "--overwrite"), "holds an input")
    assert (a / "adapter_model.safetensors").read_bytes() == before


def test_scale_unknown_inputs_are_said_in_the_notes(tmp_path):
    """An MLX folder without a scale reads at s = 1 (flag scale-unknown); resize and merge write s = 1 as if it were
    known, so their notes must say the input's scale was unknown (merge weighs it against known scales)."""
    from safetensors.torch import save_file

    from lora_lens.ops import resize_adapter

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    folder = tmp_path / "mlx"
    folder.mkdir()
    save_file({"model.layers.0.self_attn.q_proj.lora_a": A.T.contiguous(),
               "model.layers.0.self_attn.q_proj.lora_b": B.T.contiguous()}, folder / "adapters.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": -1,
                                                            "lora_parameters": {"rank": 4, "keys": ["self_attn.q_proj"]}}))
    ad = load_adapter(folder)
    assert any(f.startswith("scale-unknown") for f in ad.flags)
    assert any("scale-unknown" in n for n in resize_adapter(ad, rank=2).notes)
    assert any("scale-unknown" in n for n in merge_adapters([ad, ad], [1.0, 1.0], method="cat").notes)


def test_cancelling_weights_are_named_as_a_zero_merge(llama_adapter):
    """A − A is zero in exact arithmetic: the rank-R factors are round-off, and the notes say so."""
    from lora_lens import load_adapter
    from lora_lens.ops import merge_adapters

    a = load_adapter(llama_adapter[1])
    res = merge_adapters([a, a], [1.0, -1.0], method="svd", rank=2)
    assert any("cancel" in n for n in res.notes), res.notes
    kept = merge_adapters([a, a], [1.0, -0.5], method="svd", rank=2)
    assert not any("cancel" in n for n in kept.notes), kept.notes


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_ties_sign_election_equals_peft(sign_method):
    """--majority-sign-method: one large positive against two small negatives elects + by total, − by frequency;
    ours equals PEFT's own ``merge_utils.ties`` on random stacks as well."""
    from peft.utils.merge_utils import ties as peft_ties

    g = torch.Generator().manual_seed(0)
    d = [torch.tensor([[5.0]]), torch.tensor([[-1.0]]), torch.tensor([[-1.0]])]
    got = anchor_merge(d, torch.ones(3), "ties", 1.0, sign_method, g)
    assert float(got) == (5.0 if sign_method == "total" else -1.0)
    stack = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    w = torch.tensor([0.7, 0.2, 0.5], dtype=torch.float64)
    ours = anchor_merge(stack, w, "ties", 0.6, sign_method, g)
    assert torch.allclose(ours, peft_ties(stack, w, 0.6, sign_method), rtol=0, atol=1e-12)


def test_cli_majority_sign_method_reaches_the_merge(llama_adapter, second_adapter, tmp_path):
    args = [llama_adapter[1], second_adapter, "--weights", "0.6,0.4", "--method", "ties", "--density", "0.5",
            "--rank", "2"]
    for sm in ("total", "frequency"):
        r = run("merge", *args, "--majority-sign-method", sm, "-o", tmp_path / sm)
        assert r.exit_code == 0, r.output
    a, b = load_adapter(tmp_path / "total"), load_adapter(tmp_path / "frequency")
    # with two adapters, frequency ties (+1 − 1 = 0 → +) wherever the signs differ, so the merges differ
    assert any(not torch.allclose(a[n].delta(), b[n].delta()) for n in a.names)
    assert_bad_input(run("merge", *args, "--majority-sign-method", "vote", "-o", tmp_path / "x"), "vote")
