"""The CUDA path against the CPU path and float64 references (skipped without a GPU).

CI has no GPU; these run where one is lent (``benchmarks/gpu_check.sh``). Each
test compares what the GPU computes with an independent reference: a float64
SVD on the CPU, or the same public call on the CPU.
"""

import math

import pytest
import torch

from lora_lens.compute import Compute
from lora_lens.linalg import factored_svd, phi, randomized_svd
from lora_lens.randomized import range_svd

from .matrix_utils import planted
from .tolerances import U32

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


def test_batched_factored_svd_on_cuda_matches_float64():
    """ΔW = s·B A by QR of the factors + small SVD, batched on the GPU: σ and the top subspace of a float64 SVD."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(6, 512, 16, generator=g), torch.randn(6, 16, 384, generator=g) / 20
    U, S, Vh = factored_svd(B.to(CUDA), A.to(CUDA), 2.0)
    assert U.device.type == "cuda"
    U64, S64, _ = torch.linalg.svd(2.0 * B.double() @ A.double(), full_matrices=False)
    assert ((S.cpu().double() - S64[:, :16]).abs() / S64[:, :1]).max() <= 64 * U32
    for i in range(6):
        assert phi(U[i].cpu().double(), U64[i, :, :8]) >= 1 - 1e-5


@pytest.mark.parametrize("decay", [0.5, 1.0, 2.0])
def test_range_finder_on_cuda_with_half_passes_matches_float64(decay):
    """bf16 weights on CUDA (half passes on by default there): as accurate as the float32 passes on the GPU and the
    CPU; a steep spectrum is redone in float32."""
    i = torch.arange(1, 401, dtype=torch.float64)
    W = planted(600, 400, i ** -decay, dtype=torch.bfloat16)
    U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
    k = 24
    errs = {}
    for name, w, half in (("gpu half", W.to(CUDA), None), ("gpu fp32", W.to(CUDA), False), ("cpu fp32", W, False)):
        res = range_svd(w, k, half_passes=half, seed=3)
        errs[name] = ((res.S.cpu().double() - S[:k]).abs().max().item() / S[0].item(),
                      1 - phi(res.U.cpu().double(), U[:, :k]).item())
        if name == "gpu half":
            steep = S[k - 1] / S[0] < 2 ** -6
            assert int(res.half_passes) == (0 if steep else 6)
    floor = 16 * U32
    for j in range(2):
        assert errs["gpu half"][j] <= 2 * errs["cpu fp32"][j] + floor, errs
        assert abs(errs["gpu fp32"][j] - errs["cpu fp32"][j]) <= floor + 0.1 * errs["cpu fp32"][j], errs


def test_decompose_base_on_cuda_matches_cpu(tmp_path):
    """decompose_base on the GPU (bf16 stack, half passes) vs the CPU (float32 passes): σ and subspaces agree."""
    from safetensors.torch import save_file

    from lora_lens import open_base
    from lora_lens.decompose import decompose_base

    i = torch.arange(1, 257, dtype=torch.float64)
    weights = {f"model.layers.{j}.mlp.up_proj.weight": planted(384, 256, i ** -0.5, seed=j, dtype=torch.bfloat16)
               for j in range(4)}
    save_file(weights, str(tmp_path / "model.safetensors"))
    base = open_base(tmp_path / "model.safetensors")
    names = list(weights)
    gpu = decompose_base(base, names, k=16, randomized=True, compute=Compute(device="cuda"), n_iter=8)
    cpu = decompose_base(base, names, k=16, randomized=True, compute=Compute(device="cpu", half_passes=False),
                         n_iter=8)
    for w in names:
        assert gpu[w].S.device.type == "cpu"  # results come back to the CPU
        assert ((gpu[w].S - cpu[w].S).abs() / cpu[w].S[0]).max() <= 1e-4
        assert phi(gpu[w].U.double(), cpu[w].U.double()) >= 1 - 1e-4


def test_randomized_svd_sign_fix_and_fallback_on_cuda():
    """The exact-SVD fallback (q ≥ min(m, n)) and the sign convention hold on CUDA as on the CPU."""
    W = planted(40, 30, torch.linspace(1, 0.1, 30, dtype=torch.float64), dtype=torch.float32)
    g, c = randomized_svd(W.to(CUDA), 4), randomized_svd(W, 4)
    assert torch.allclose(g.S.cpu(), c.S, atol=1e-5) and torch.allclose(g.U.cpu(), c.U, atol=1e-4)


def test_collection_on_cuda_matches_cpu(tmp_path):
    """The collection kernel (stacked bases, one Gram per module) gives the CPU's φ on the GPU."""
    from lora_lens.compare.collection import CollectionSettings, collection_similarity

    from .adapter_utils import write_planted_collection

    paths, _ = write_planted_collection(tmp_path)
    gpu = collection_similarity(paths, CollectionSettings(device="cuda"))
    cpu = collection_similarity(paths, CollectionSettings(device="cpu"))
    assert (gpu.phi - cpu.phi).abs().max() <= 1e-5
    assert (gpu.random_phi - cpu.random_phi).abs().max() <= 1e-5


def test_training_steps_on_cuda(tmp_path, stories_path):
    """A few LoRA steps of the real stories260K on the GPU: the loss falls and the adapter is written, on the CPU."""
    from lora_lens.train import train

    res = train(stories_path, "lora", out=tmp_path / "out", steps=12, lr=5e-3, seq_len=32,
                batch_size=4, device="cuda", seed=0)
    losses = [x for x in res.losses if not math.isnan(x)]
    assert losses[-1] < losses[0]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_small_svd_on_cuda_keeps_relative_accuracy_on_graded_matrices():
    """The Ritz step's batched gesvda (through the Gram, in float64): σ from 1 to 1e-4 to float32 accuracy."""
    from lora_lens.randomized import small_svd

    sig = torch.logspace(0, -4, 80, dtype=torch.float64)
    R = torch.stack([planted(80, 80, sig, seed=s) for s in range(8)]).float()
    S64 = torch.linalg.svdvals(R.double())
    U, S, Vh = small_svd(R.to(CUDA))
    assert ((S.cpu().double() - S64).abs() / S64).max() <= 1e-5
    assert (S.cpu() - small_svd(R.to(CUDA), values_only=True).cpu()).abs().max() <= 1e-6
    recon = (U * S[..., None, :]) @ Vh
    assert ((recon.cpu().double() - R.double()).abs().max()) <= 64 * U32


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_resize_and_merge_on_cuda_match_float64(llama_adapter, tiny_llama, tmp_path):
    """resize and merge --method svd (the folded factored kernel) on the GPU: the rank-k update and the error
    records of the same call in float64 on the CPU; the factors come back to the CPU."""
    from lora_lens import load_adapter
    from lora_lens.ops import merge_adapters, resize_adapter

    from .adapter_utils import make_peft_adapter

    make_peft_adapter(tiny_llama[0], tmp_path / "b", seed=5, r=3, lora_alpha=5, target_modules=["q_proj", "v_proj"])
    a, b = load_adapter(llama_adapter[1]), load_adapter(tmp_path / "b")
    runs = [(lambda **kw: resize_adapter(a, rank=2, **kw)),
            (lambda **kw: merge_adapters([a, b], [0.7, -0.3], method="svd", rank=3, **kw))]
    for call in runs:
        gpu, ref = call(compute=Compute(device="cuda")), call(device="cpu", dtype="float64")
        for m in gpu.adapter:
            assert m.A.device.type == "cpu" and m.B.device.type == "cpu"
            assert _rel(m.delta(torch.float64), ref.adapter[m.name].delta(torch.float64)) <= 1e-5, m.name
        for g, r in zip(gpu.records, ref.records):
            assert g["rank_after"] == r["rank_after"]
            assert g["fro_error"] == pytest.approx(r["fro_error"], rel=1e-4, abs=1e-6 * (1 + r["fro_error"]))


def test_extract_on_cuda_matches_float64(tiny_llama, tmp_path):
    """extract on the GPU (ΔW built on the device, range finder there): the rank-3 factors of a planted rank-3
    change plus noise equal the float64 CPU run's (the gap σ₃/σ₄ ≈ 20 makes that cut well defined)."""
    from lora_lens.ops.extract import extract_lora

    from .test_ops_extract import _plant, _tuned

    base = tiny_llama[1]
    tuned, _, _ = _tuned(base, tmp_path / "tuned", _plant(("q_proj.weight", "up_proj.weight"), noise=1e-3))
    gpu = extract_lora(base, tuned, None, rank=3, targets="q_proj,up_proj", device="cuda")
    ref = extract_lora(base, tuned, None, rank=3, targets="q_proj,up_proj", device="cpu", dtype="float64")
    want = {m.weight: m for m in ref.modules}
    assert len(gpu.modules) == len(want) == 6
    for m in gpu.modules:
        r = want[m.weight]
        assert m.B.device.type == "cpu" and m.rank == r.rank == 3
        assert _rel(m.B @ m.A, r.B @ r.A) <= 1e-4, m.weight
        assert m.residual == pytest.approx(r.residual, rel=1e-3)


def test_tf32_set_by_the_caller_does_not_reach_our_products():
    """A program that turned TF32 on (HF ``tf32=True``, Lightning's advice) still gets float32-exact spectra: the
    same factored SVD as with TF32 off, while a plain product in that program shows TF32's ~1e-4 error."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(4, 2048, 16, generator=g), torch.randn(4, 16, 1024, generator=g)
    S64 = torch.linalg.svdvals(B.double() @ A.double())[:, :16]
    X, Y = torch.randn(1024, 1024, generator=g), torch.randn(1024, 1024, generator=g)
    ref = X.double() @ Y.double()
    saved = torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        plain = float(((X.to(CUDA) @ Y.to(CUDA)).cpu().double() - ref).norm() / ref.norm())
        _, S, _ = factored_svd(B.to(CUDA), A.to(CUDA), 1.0)
        assert torch.backends.cuda.matmul.allow_tf32  # the caller's setting is back
    finally:
        torch.set_float32_matmul_precision(saved)
    if torch.cuda.get_device_capability()[0] >= 8:  # TF32 exists from Ampere on: the control must show it
        assert plain > 1e-5, plain
    assert ((S.cpu().double() - S64).abs() / S64[:, :1]).max() <= 64 * U32


def test_folded_condition_number_on_cuda_sees_a_singular_factor():
    """The folded kernel's ``cond`` on CUDA (the trigger of the exact path in ops/resize.py, eps·cond ≤ 1e-5) reads a
    rank-deficient B as singular in float64 and float32."""
    from lora_lens.linalg import factored_svd_folded

    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(4, 40, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, 30, generator=g, dtype=torch.float64)
    B[:, :, 1] = B[:, :, 0]  # rank 4 of 5
    for dt in (torch.float64, torch.float32):
        cond = factored_svd_folded(B.to(CUDA, dt), A.to(CUDA, dt))[3].cpu()
        assert (cond * torch.finfo(dt).eps > 1e-5).all(), (dt, cond)


def test_factored_svd_on_cuda_keeps_orthonormal_vectors_of_a_rank_deficient_update():
    """ΔW = B A with dead columns of B (rank 5 of 8): the float64 core SVD on CUDA keeps U and Vh orthonormal, the
    zero singular values at zero, and the top 5 equal to a float64 SVD of the dense ΔW."""
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(3, 300, 8, generator=g), torch.randn(3, 8, 200, generator=g)
    B[:, :, 5:] = 0
    U, S, Vh = (x.cpu().double() for x in factored_svd(B.to(CUDA), A.to(CUDA)))
    eye = torch.eye(8, dtype=torch.float64)
    assert (U.mT @ U - eye).abs().max() <= 1e-5 and (Vh @ Vh.mT - eye).abs().max() <= 1e-5
    S64 = torch.linalg.svdvals(B.double() @ A.double())[:, :8]
    assert ((S - S64).abs() / S64[:, :1]).max() <= 64 * U32
    assert (S[:, 5:] <= 1e-5 * S[:, :1]).all()
