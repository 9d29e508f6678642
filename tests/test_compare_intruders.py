"""Intruder dimensions against a direct implementation, constructed cases, and real stories260K weights."""

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lens import ConfigError, load_adapter, open_base
from lora_lens.compare import analyze_alignment, intruder_dimensions, max_cosines
from lora_lens.keys import parse_module_path
from lora_lens.types import Adapter, LoraModule, LoraSettings

from .adapter_utils import make_peft_adapter
from .alignment_refs import base_matrix, ref_alignment


def ref_max_cos(W0: np.ndarray, dW: np.ndarray, k: int) -> np.ndarray:
    """Shuttleworth et al.: m_j = max_i |cos(y_j, x_i)| over W0's left singular vectors (thin SVD)."""
    X = np.linalg.svd(W0, full_matrices=False)[0]
    Y = np.linalg.svd(W0 + dW, full_matrices=False)[0][:, :k]
    return np.abs(Y.T @ X).max(axis=1)


def check_intruders(adapter, base_folder: Path, k=10, eps=(0.3, 0.5, 0.7), atol=1e-8, **kw):
    state = load_file(base_folder / "model.safetensors")
    res = intruder_dimensions(adapter, open_base(base_folder), k=k, epsilon=list(eps), **kw)
    assert res.epsilons == eps and [m.name for m in res.modules] == adapter.names
    totals = np.zeros(len(eps), dtype=int)
    for row in res.modules:
        mod = adapter[row.name]
        ref = ref_max_cos(base_matrix(state, row.weight, mod.layout), mod.delta(torch.float64).numpy(), k)
        assert np.allclose(row.max_cos, ref, atol=atol), row.name
        counts = [int((ref < e).sum()) for e in eps]
        assert list(row.counts) == counts
        totals += counts
    assert list(res.totals) == totals.tolist()
    assert list(res.totals) == sorted(res.totals)  # a larger ε can only flag more
    return res


def test_llama_intruders_match_direct(tiny_llama, llama_adapter):
    res = check_intruders(load_adapter(llama_adapter[1]), Path(tiny_llama[1]), dtype="float64")
    assert 0 < res.totals[-1]  # random B of PEFT's init_lora_weights=False dwarfs W0: intruders exist


def test_gpt2_conv1d_intruders_match_direct(tiny_gpt2, gpt2_adapter):
    check_intruders(load_adapter(gpt2_adapter[1]), Path(tiny_gpt2[1]), k=5, dtype="float64")


def _one_module_case(tmp_path, W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor):
    name = "layers.0.proj"
    save_file({name + ".weight": W0.float().contiguous()}, tmp_path / "w.safetensors")
    mod = LoraModule(name, parse_module_path(name), A.float(), B.float(), alpha=1.0, scaling=1.0)
    return Adapter(tmp_path, LoraSettings(1, 1.0), (mod,)), open_base(tmp_path / "w.safetensors")


def _w0(d=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    Y = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    sig = torch.linspace(10, 1, d, dtype=torch.float64)
    return X, sig, Y, (X * sig) @ Y.T


def test_new_direction_is_an_intruder(tmp_path):
    X, sig, Y, W0 = _w0()
    # a direction spread over W0's 12 weakest left singular vectors: no single x_i is close (|cos| = 1/√12)
    u = X[:, 12:].sum(1) / np.sqrt(12)
    v = Y[:, 12:].sum(1) / np.sqrt(12)
    adapter, base = _one_module_case(tmp_path, W0, 30 * u[:, None], v[None, :])
    res = intruder_dimensions(adapter, base, k=10, epsilon=[0.2, 0.5])
    m = res.modules[0]
    # the top vector is ≈ u (W0's weak block tilts it a little): far from every x_i
    assert m.max_cos[0] == pytest.approx(1 / np.sqrt(12), abs=0.05)
    assert all(c > 0.999 for c in m.max_cos[1:])  # the rest are W0's top directions, untouched
    assert m.counts == (0, 1) and res.totals == (0, 1)


def test_scaling_an_existing_direction_is_not(tmp_path):
    X, sig, Y, W0 = _w0()
    # amplify W0's 5th direction until it becomes the strongest: same singular vectors, no intruder
    adapter, base = _one_module_case(tmp_path, W0, 20 * X[:, 4:5], Y[:, 4:5].T)
    m = intruder_dimensions(adapter, base, k=10).modules[0]
    assert min(m.max_cos) > 0.999 and m.counts == (0,)


def test_max_cosines_kernel_batched():
    gen = torch.Generator().manual_seed(0)
    X = torch.linalg.qr(torch.randn(3, 20, 20, generator=gen, dtype=torch.float64))[0]
    Y = torch.linalg.qr(torch.randn(3, 20, 4, generator=gen, dtype=torch.float64))[0]
    got = max_cosines(X, Y)
    for b in range(3):
        assert np.allclose(got[b].numpy(), np.abs(Y[b].numpy().T @ X[b].numpy()).max(1))
    assert torch.allclose(max_cosines(X, X[..., :5]), torch.ones(3, 5, dtype=torch.float64))


def test_bad_parameters(tiny_llama, llama_adapter):
    adapter, base = load_adapter(llama_adapter[1]), open_base(tiny_llama[1])
    for kw in ({"epsilon": 1.5}, {"epsilon": []}, {"k": 0}):
        with pytest.raises(ConfigError):
            intruder_dimensions(adapter, base, **kw)


@pytest.mark.realmodel
def test_stories260k_real_weights(stories_path, tmp_path):
    """A PEFT adapter on the real stories260K: alignment and intruders against float64 by hand."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(stories_path).eval()
    make_peft_adapter(model, tmp_path, seed=5, r=4, lora_alpha=4,
                      target_modules=["q_proj", "k_proj", "up_proj", "down_proj"])
    adapter = load_adapter(tmp_path)
    # shapes: q 64×64, k 32×64 (GQA, wide), up 172×64 (tall), down 64×172 (wide); 5 layers each
    assert {m.shape for m in adapter} == {(64, 64), (32, 64), (172, 64), (64, 172)} and len(adapter) == 20
    res = analyze_alignment(adapter, open_base(stories_path), intruder_k=10, epsilon=[0.5, 0.9], dtype="float64")
    state = load_file(stories_path / "model.safetensors")
    for al, it in zip(res.alignment.modules, res.intruders.modules):
        mod = adapter[al.name]
        W0 = base_matrix(state, al.weight, mod.layout)
        ref = ref_alignment(mod, W0)
        for key, v in ref.items():
            assert getattr(al, key) == pytest.approx(v, rel=1e-9), (al.name, key)
        assert np.allclose(it.max_cos, ref_max_cos(W0, mod.delta(torch.float64).numpy(), 10), atol=1e-8)
    assert res.intruders.totals[0] <= res.intruders.totals[1]
