"""decompose_base / decompose_matrices and the chunk iterator: chunked = unchunked, randomized vs exact, layouts.

The memory budget only decides how many matrices one batched call sees; every
random sketch is seeded from its matrix's name, so a result must not depend on
``max_memory``. Before per-item seeds, one sketch was drawn per chunk and the
numbers moved by ~1e-2 with the budget; here they agree to float64 round-off.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_lens import ConfigError, open_base
from lora_lens.chunks import chunks, load_w0, stack
from lora_lens.compute import DEFAULT_MAX_MEMORY, Compute, as_compute, item_seed
from lora_lens.decompose import decompose_base, decompose_matrices
from lora_lens.linalg import phi, randomized_svd
from lora_lens.methods import cora_basis

EPS64 = torch.finfo(torch.float64).eps
M, N, K, LAYERS = 96, 80, 4, 5


def _roundoff(m: int, n: int, n_iter: int) -> float:
    """Relative bound (× σ_1) for two float64 runs of the same range finder that differ only in batching.

    Each of its ``2·n_iter + 3`` products and QRs is backward stable with a
    relative error of at most ``γ ≈ max(m, n)·u``; a margin of 10 covers the
    small SVD. Singular values move by at most that (Weyl); the top-k
    subspace and the truncation ``U S Vh`` by that times ``σ_1 / (σ_k − σ_{k+1})``
    (Davis–Kahan), see :func:`_gap`. (A different sketch moves σ by ~2e-2 and
    φ between the subspaces to ~0.67 at ``n_iter = 1``: far above this.)
    On the CPU the runs are in fact bit-identical, with 1 or 2 threads.
    """
    return 10 * (2 * n_iter + 3) * max(m, n) * EPS64


def _gap(W: torch.Tensor, k: int) -> float:
    """``σ_1 / (σ_k − σ_{k+1})`` of ``W`` (exact, float64): how much round-off a top-k subspace amplifies."""
    s = torch.linalg.svdvals(W.double())
    return float(s[0] / (s[k - 1] - s[k]))


def _flat_weights(layers: int = LAYERS, m: int = M, n: int = N, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gaussian weights (a flat spectrum: the hardest case for a range finder, so a sketch change shows)."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.q_proj.weight": torch.randn(m, n, generator=g) for i in range(layers)}


@pytest.fixture(scope="module")
def flat_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flat_base")
    save_file(_flat_weights(), folder / "model.safetensors")
    return open_base(folder)


def _lowrank_part(sp) -> torch.Tensor:
    return sp.U @ torch.diag(sp.S) @ sp.Vh  # (m, n): independent of the singular vectors' signs and rotations


@pytest.mark.parametrize("budget", [1, 2 * 3 * M * N * 8, None])
def test_decompose_base_same_numbers_for_every_max_memory(flat_base, budget):
    names = flat_base.names()
    ref = decompose_base(flat_base, names, k=K, randomized=True, n_iter=1,
                         compute=Compute("cpu", "float64", max_memory=None, seed=3))  # one chunk of 5
    got = decompose_base(flat_base, names, k=K, randomized=True, n_iter=1,
                         compute=Compute("cpu", "float64", max_memory=budget, seed=3))
    tol = _roundoff(M, N, 1)
    for w in names:
        assert not ref[w].exact
        scale = float(ref[w].S[0])
        assert torch.allclose(got[w].S, ref[w].S, rtol=0, atol=tol * scale)
        assert torch.allclose(_lowrank_part(got[w]), _lowrank_part(ref[w]), rtol=0,
                              atol=tol * scale * _gap(flat_base.get(w), K))


@pytest.mark.parametrize("n_iter", [1, "auto"])
def test_prefetch_and_threads_change_no_number(tmp_path, n_iter):
    """Reading the next chunk on a thread overlaps I/O only: bit-identical results, several chunks and two shapes."""
    weights = {**_flat_weights(), **{k.replace("q_proj", "o_proj"): v[:64] for k, v in _flat_weights(seed=1).items()}}
    weights = {k: v.bfloat16() for k, v in weights.items()}
    save_file(weights, tmp_path / "model.safetensors")
    base, names = open_base(tmp_path), list(weights)
    cx = Compute("cpu", max_memory=2 * (4 * M * N + (M + N) * N) * 4, seed=5)  # 2 weights a chunk: 3 + 3 chunks
    on = decompose_base(base, names, k=K, randomized=True, n_iter=n_iter, compute=cx)
    off = decompose_base(base, names, k=K, randomized=True, n_iter=n_iter, prefetch=False, compute=cx)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        other = decompose_base(base, names, k=K, randomized=True, n_iter=n_iter, compute=cx)
    finally:
        torch.set_num_threads(threads)
    for w in names:
        assert torch.equal(on[w].S, off[w].S) and torch.equal(on[w].U, off[w].U) and torch.equal(on[w].Vh, off[w].Vh)
        # another thread count may block the products differently: float32 round-off, as _roundoff derives it
        # (n_iter=1: 5 products/QRs deep; "auto" at this size: one full SVD, counted the same)
        tol = 10 * (2 * 1 + 3) * M * torch.finfo(torch.float32).eps * float(on[w].S[0])
        assert torch.allclose(other[w].S, on[w].S, rtol=0, atol=tol)


def test_randomized_svd_seed_per_matrix_matches_single_calls():
    W = torch.stack(list(_flat_weights().values())).double()  # (L, m, n)
    seeds = [item_seed(0, f"w{i}") for i in range(len(W))]
    U, S, Vh = randomized_svd(W, K, n_iter=1, seed=seeds)
    tol = _roundoff(M, N, 1)
    for i in range(len(W)):
        u, s, vh = randomized_svd(W[i], K, n_iter=1, seed=seeds[i])
        assert torch.allclose(S[i], s, rtol=0, atol=tol * float(s[0]))
        assert torch.allclose(U[i] @ torch.diag(S[i]) @ Vh[i], u @ torch.diag(s) @ vh, rtol=0,
                              atol=tol * float(s[0]) * _gap(W[i], K))
    # and the seed matters: another one gives other numbers at n_iter = 1 (a flat spectrum)
    other = randomized_svd(W[0], K, n_iter=1, seed=seeds[0] + 1)[1]
    assert not torch.allclose(other, S[0], rtol=1e-6)


def test_decompose_matrices_chunked_equals_unchunked_and_exact_reference():
    mats = {f"m{i}": w.double() for i, w in enumerate(_flat_weights(layers=4, m=20, n=12).values())}
    whole = decompose_matrices(mats, compute=Compute("cpu", "float64", max_memory=None))
    one_by_one = decompose_matrices(mats, compute=Compute("cpu", "float64", max_memory=1))
    for name, W in mats.items():
        ref = torch.linalg.svdvals(W)  # float64 LAPACK, one matrix at a time
        for sp in (whole[name], one_by_one[name]):
            assert sp.exact and sp.k == 12
            # backward-stable SVD: |σ̂ − σ| ≤ c·max(m, n)·u·σ_1
            assert torch.allclose(sp.S, ref, rtol=0, atol=10 * 20 * EPS64 * float(ref[0]))
            assert torch.allclose(_lowrank_part(sp), W, rtol=0, atol=10 * 20 * EPS64 * float(ref[0]))
            assert torch.allclose(sp.U.T @ sp.U, torch.eye(12, dtype=torch.float64), atol=100 * EPS64)


def test_randomized_matches_exact_with_a_spectral_gap():
    """With σ_{k+1}/σ_k = 1e-3 the range finder's error is ~(1e-3)^(2q+1) σ: exact to float64 round-off."""
    g = torch.Generator().manual_seed(1)
    m, n = 120, 90
    Uq, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    Vq, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    sigma = torch.cat([torch.tensor([10.0, 8.0, 6.0, 5.0], dtype=torch.float64), 5e-3 * torch.rand(n - 4, generator=g)])
    W = Uq @ torch.diag(sigma) @ Vq.T
    cx = Compute("cpu", "float64")
    rand = decompose_matrices({"w": W}, k=K, randomized=True, n_iter=2, compute=cx)["w"]
    exact = decompose_matrices({"w": W}, k=K, randomized=False, compute=cx)["w"]
    assert not rand.exact and exact.exact
    assert torch.allclose(rand.S, sigma[:K], rtol=1e-10)
    assert torch.allclose(exact.S, sigma[:K], rtol=1e-10)
    assert float(phi(rand.U, exact.U)) == pytest.approx(1.0, abs=1e-10)
    # "auto" picks the range finder only when k + oversample < min(m, n) / 2
    assert not decompose_matrices({"w": W}, k=K, compute=cx)["w"].exact
    assert decompose_matrices({"w": W}, k=40, compute=cx)["w"].exact


def test_decompose_base_layouts_transpose_and_flatten(tmp_path):
    g = torch.Generator().manual_seed(2)
    stored = torch.randn(12, 7, generator=g, dtype=torch.float64)  # a Conv1D stores (n, m) = (12, 7)
    kernel = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)  # Conv (out, in, kh, kw)
    save_file({"h.0.attn.c_attn.weight": stored, "h.0.conv.weight": kernel}, tmp_path / "model.safetensors")
    base = open_base(tmp_path)
    cx = Compute("cpu", "float64")
    out = decompose_base(base, ["h.0.attn.c_attn.weight", "h.0.conv.weight"],
                         layouts={"h.0.attn.c_attn.weight": "conv1d", "h.0.conv.weight": "conv"}, compute=cx)
    sp = out["h.0.attn.c_attn.weight"]
    assert sp.shape == (7, 12)  # decomposed as ΔW-shaped (m, n) = stored.T
    assert torch.allclose(_lowrank_part(sp), stored.T, atol=1e-12)
    conv = out["h.0.conv.weight"]
    assert conv.shape == (6, 18) and torch.allclose(_lowrank_part(conv), kernel.reshape(6, 18), atol=1e-12)
    assert torch.equal(load_w0(base, "h.0.attn.c_attn.weight", "conv1d"), stored.T)
    with pytest.raises(Exception, match="expected"):
        load_w0(base, "h.0.attn.c_attn.weight", "linear", expect=(7, 12))


def _stacked_layers(tmp_path, layers=4, m=64, n=48):
    g = torch.Generator().manual_seed(4)
    save_file({f"model.layers.{i}.mlp.up_proj.weight": torch.randn(m, n, generator=g) for i in range(layers)},
              tmp_path / "model.safetensors")
    return open_base(tmp_path)


@pytest.mark.parametrize("shared", [False, True])
def test_cora_basis_same_numbers_for_every_max_memory(tmp_path, shared):
    base = _stacked_layers(tmp_path)
    kw = dict(share_across_layers=shared, n_iter=1)
    whole = cora_basis(base, 4, "up_proj", compute=Compute("cpu", "float64", max_memory=None), **kw)
    single = cora_basis(base, 4, "up_proj", compute=Compute("cpu", "float64", max_memory=1), **kw)
    assert whole.bases.keys() == single.bases.keys()
    tol = _roundoff(64, 48 * 4, 1)  # shared: G sums the 4 layers, (m, L·n) worth of products
    for key in whole.bases:
        s = whole.singular_values[key]
        assert torch.allclose(single.singular_values[key], s, rtol=0, atol=tol * float(s[0]))
        P, Q = whole.bases[key], single.bases[key]  # (m, r) orthonormal
        W = torch.cat([base.get(n) for n in base.names()], 1) if shared else base.get(f"{key}.weight")
        assert torch.allclose(P @ P.T, Q @ Q.T, rtol=0, atol=tol * _gap(W, 4))


def test_trainer_cora_basis_from_base_is_the_cora_init_basis(tmp_path):
    """train's CoRA-from-base basis (in-memory weights) is methods.cora's basis for the same file, bit for bit."""
    from lora_lens.train.inits import cora_basis_from_base

    base = _stacked_layers(tmp_path, m=96, n=80)  # r + 16 < min(m, n)/2: the randomized kernel, not a full SVD
    ref = cora_basis(base, 4, "up_proj", device="cpu")
    weights = {f"model.layers.{i}.mlp.up_proj": base.get(f"model.layers.{i}.mlp.up_proj.weight") for i in range(4)}
    for budget in (None, 1):  # one chunk, or one layer per chunk
        got = cora_basis_from_base(weights, 4, compute=Compute("cpu", max_memory=budget))
        assert got.keys() == ref.bases.keys()
        for p in got:
            assert torch.equal(got[p], ref.bases[p])


def test_trainer_cora_basis_runs_on_the_compute_device(monkeypatch):
    """An explicit ``compute``'s device is used (the ``device`` argument's old default "cpu" overrode it)."""
    from lora_lens.train import inits

    seen = []

    class Stop(Exception):
        pass

    def record(cx, names, load):
        seen.append(cx.device)
        raise Stop  # before any work on a device this machine may not have

    monkeypatch.setattr(inits, "stack", record)
    weights = {"model.layers.0.mlp.up_proj": torch.zeros(8, 6)}
    for kw, want in (({"compute": Compute(torch.device("cuda"))}, "cuda"), ({}, "cpu"),
                     ({"compute": Compute(torch.device("cuda")), "device": "cpu"}, "cpu")):
        with pytest.raises(Stop):
            inits.cora_basis_from_base(weights, 2, **kw)
        assert seen.pop().type == want, kw


def test_chunks_group_by_shape_budget_and_progress():
    items = [("a", (2, 3)), ("b", (4, 4)), ("c", (2, 3)), ("d", (2, 3))]
    calls = []
    cx = Compute("cpu", max_memory=20, progress=lambda *a: calls.append(a))
    runs = [(key, [name for name, _ in run]) for key, run in chunks(items, lambda t: t[1], lambda key: 10, cx)]
    assert runs == [((2, 3), ["a", "c"]), ((2, 3), ["d"]), ((4, 4), ["b"])]
    assert [c[:2] for c in calls] == [(2, 4), (3, 4), (4, 4)]
    X = stack(cx, [torch.ones(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3)], lambda t: t)
    assert X.shape == (2, 2, 3) and X.dtype == torch.float32


def test_stack_keeps_one_stored_dtype_and_upcasts_a_mixed_run_exactly():
    """``keep``: a run all in a kept dtype stays as stored; one item of another dtype, anywhere, makes the whole
    stack the compute dtype, each item exactly its stored values (bf16, fp16 ⊂ float32: no rounding)."""
    cx, g = Compute("cpu"), torch.Generator().manual_seed(0)
    bf, f16, f32 = (torch.randn(3, 4, generator=g).to(d) for d in (torch.bfloat16, torch.float16, torch.float32))
    for items, dtype in (([bf, bf], torch.bfloat16), ([bf, f16], torch.float32), ([bf, bf, f32], torch.float32),
                         ([f32, bf], torch.float32), ([f16, f16], torch.float32)):
        X = stack(cx, items, lambda t: t, keep=(torch.bfloat16,))
        assert X.dtype == dtype and all(torch.equal(X[i].float(), t.float()) for i, t in enumerate(items))


def test_compute_resolved_once_and_keywords_folded():
    cx = Compute("cpu", "float64")
    assert cx.device == torch.device("cpu") and cx.dtype is torch.float64 and cx.max_memory == DEFAULT_MAX_MEMORY
    assert as_compute(cx) is cx
    assert as_compute(cx, device=None) is cx  # None device/dtype/seed: "keep"
    assert as_compute(cx, max_memory=None).max_memory is None  # None budget: no cap (as before Compute)
    assert as_compute(cx, seed=5).seed == 5 and as_compute(dtype=torch.float32).dtype is torch.float32
    with pytest.raises(TypeError, match="max_memroy"):
        as_compute(max_memroy=1)
    with pytest.raises(ConfigError, match="float16"):
        Compute(dtype="float16")
    # stable across processes and Python versions (BLAKE2b, not hash()); pinned
    assert item_seed(0, "model.layers.0.self_attn.q_proj") == item_seed(0, "model.layers.0.self_attn.q_proj")
    assert item_seed(0, "a") != item_seed(1, "a") != item_seed(0, "b")
    assert item_seed(0, "a") == 7340373685759566269


@pytest.mark.parametrize("budget", [None, 1])
def test_decompose_base_float32_exact_against_float64_reference(flat_base, budget):
    """The exact path in float32, whole or one matrix per chunk, against float64 LAPACK on the same stored values.

    A backward-stable SVD in float32 moves each σ by at most c·max(m, n)·u₃₂·σ_1 (Weyl), and its
    reconstruction ``U S Vh`` by the same relative amount; c = 10 covers the bidiagonalization's constant.
    Orthonormality of the computed U holds to c·max(m, n)·u₃₂. The weights are float32 in the file, so the
    reference sees exactly the values the float32 run sees.
    """
    u32 = torch.finfo(torch.float32).eps
    tol = 10 * max(M, N) * u32
    names = flat_base.names()
    got = decompose_base(flat_base, names, randomized=False,
                         compute=Compute("cpu", "float32", max_memory=budget))
    for w in names:
        W = flat_base.get(w).double()  # (m, n), the stored float32 values
        ref = torch.linalg.svdvals(W)
        sp = got[w]
        assert sp.exact and sp.S.dtype == torch.float32 and sp.k == min(M, N)
        s1 = float(ref[0])
        assert torch.allclose(sp.S.double(), ref, rtol=0, atol=tol * s1)
        assert torch.allclose(_lowrank_part(sp).double(), W, rtol=0, atol=tol * s1)
        eye = torch.eye(sp.k, dtype=torch.float64)
        assert torch.allclose(sp.U.double().T @ sp.U.double(), eye, rtol=0, atol=tol)


def test_a_shape_group_mixing_bf16_and_fp32_gives_the_same_numbers_for_every_budget(tmp_path):
    """Half passes are decided per shape group: with a float32 weight among bf16 ones of the same shape, every
    budget (one weight per chunk, or all) runs the group in float32 (before: 5e-4 on σ between budgets)."""
    from safetensors.torch import save_file

    from lora_lens import open_base

    g = torch.Generator().manual_seed(0)
    i = torch.arange(1, 97, dtype=torch.float32)
    mats = [(torch.linalg.qr(torch.randn(160, 96, generator=g))[0] * i ** -0.5) @ torch.linalg.qr(
        torch.randn(96, 96, generator=g))[0].T for _ in range(3)]
    dtypes = (torch.bfloat16, torch.float32, torch.bfloat16)
    weights = {f"model.layers.{j}.mlp.up_proj.weight": w.to(d).contiguous() for j, (w, d) in enumerate(zip(mats, dtypes))}
    save_file(weights, str(tmp_path / "model.safetensors"))
    base, names = open_base(tmp_path / "model.safetensors"), list(weights)
    runs = [decompose_base(base, names, k=8, randomized=True, compute=Compute("cpu", max_memory=b, half_passes=True))
            for b in (1, None)]
    for w in names:
        assert torch.equal(runs[0][w].S, runs[1][w].S) and torch.equal(runs[0][w].U, runs[1][w].U)
