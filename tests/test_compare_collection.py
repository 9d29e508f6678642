"""Collections: φ against an independent float64 reference, planted structure recovered, shared basis, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_lens.compare.collection import CollectionSettings, collection_similarity, plan_collection
from lora_lens.compare.collection_structure import collection_structure
from lora_lens.errors import ConfigError, KeyMatchError, ShapeError
from lora_lens.io import load_adapter, save_peft_adapter
from lora_lens.io.lazy import index_adapter
from lora_lens.keys import parse_module_path
from lora_lens.types import LoraModule

from .adapter_utils import PLANTED
from .tolerances import U64, gamma

F64 = CollectionSettings(device="cpu", dtype="float64", shared_rank=PLANTED["groups"] * PLANTED["rank"])


def _reference_phi(paths, k, side="both"):
    """Pairwise φ from materialized ΔW and a full float64 SVD each (the naive way), mean over modules;
    ``side``: left vectors (out), right (in) or the mean of both."""
    ads = [load_adapter(p) for p in paths]
    N = len(ads)
    out = np.zeros((N, N))
    for name in ads[0].names:
        U, V = [], []
        for a in ads:
            u, _, vh = np.linalg.svd(a[name].delta(torch.float64).numpy())
            U.append(u[:, :k])
            V.append(vh[:k].T)
        for i in range(N):
            for j in range(N):
                po, pi = np.sum((U[i].T @ U[j]) ** 2) / k, np.sum((V[i].T @ V[j]) ** 2) / k
                out[i, j] += {"out": po, "in": pi, "both": 0.5 * (po + pi)}[side]
    return out / len(ads[0].names)


def _kappa(paths) -> float:
    """Largest κ(B)·κ(A) over every module of every adapter."""
    return max(float(torch.linalg.cond(m.B.double()) * torch.linalg.cond(m.A.double()))
               for p in paths for m in load_adapter(p))


def test_phi_matches_the_naive_pairwise_reference(planted_collection):
    from dataclasses import replace

    paths, _ = planted_collection
    k, d = PLANTED["rank"], max(PLANTED["m"], PLANTED["n"])
    coll = collection_similarity(paths, replace(F64, side="both"))
    ref = _reference_phi(paths, k)
    # Both sides are backward stable in float64; the reference takes the top-k singular vectors of ΔW = s·B·A,
    # whose subspace moves by ≤ γ·‖ΔW‖/σ_k ≤ γ·κ(B)·κ(A), ours the spans of B and Aᵀ (QR, ≤ γ·κ). φ moves by
    # ≤ 2k × the perturbation of each of the two bases.
    tol = 8 * k * gamma(d, U64) * _kappa(paths)
    np.testing.assert_allclose(coll.phi.numpy(), ref, atol=tol)
    for side in ("out", "in"):
        got = collection_similarity(paths, replace(F64, side=side)).phi.numpy()
        np.testing.assert_allclose(got, _reference_phi(paths, k, side), atol=tol)
    # Left: p·r = 56 > m = 40 (F Fᵀ and the blocked Gram); right: p·r ≤ n = 56 (one Gram): both paths ran.
    assert len(paths) * PLANTED["rank"] > PLANTED["m"] and len(paths) * PLANTED["rank"] <= PLANTED["n"]


def test_float32_and_row_blocks_agree_with_float64(planted_collection):
    paths, _ = planted_collection
    ref = collection_similarity(paths, F64).phi
    small = CollectionSettings(device="cpu", dtype="float32", max_memory=1, shared_rank=F64.shared_rank)
    got = collection_similarity(paths, small).phi
    # k = r: φ compares span(B) and span(Aᵀ), computed by Householder QR, whose backward error γ_d perturbs a
    # basis by ≤ γ_d·κ(factor) (κ: the factor's condition number); φ = ‖U_iᵀU_j‖²/k moves by at most
    # 2·k·(that, for both bases) plus the Gram's own rounding 2·k·γ_d (cosines of unit vectors, length d).
    ads = [load_adapter(p) for p in paths]
    kappa = max(float(torch.linalg.cond(f.double())) for a in ads for m in a for f in (m.B, m.A.T))
    d, k = max(PLANTED["m"], PLANTED["n"]), PLANTED["rank"]
    tol = 2 * k * (2 * gamma(d) * kappa) + 2 * k * gamma(d)
    assert tol < 0.01  # meaningful: the groups differ in φ by ~0.9
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=tol)


def test_planted_groups_duplicate_and_outlier_are_recovered(planted_collection):
    from sklearn.metrics import adjusted_rand_score

    paths, truth = planted_collection
    coll = collection_similarity(paths, F64)
    st = collection_structure(coll)  # auto: K by silhouette
    assert adjusted_rand_score(truth, st.labels) == 1.0
    assert st.n_clusters == PLANTED["groups"] + 1  # the outlier alone
    phi = coll.phi.numpy()
    same = np.equal.outer(truth, truth) & ~np.eye(len(truth), dtype=bool)
    assert phi[same].min() > 0.9 > 5 * phi[~np.equal.outer(truth, truth)].max()
    dup = PLANTED["groups"] * PLANTED["per_group"]
    assert (0, dup) in [(i, j) for i, j, _ in st.duplicates]
    assert all(truth[i] == truth[j] for i, j, _ in st.duplicates)  # duplicates only within groups
    outlier = len(paths) - 1
    assert list(st.outliers) == [outlier]
    assert any(r.startswith("isolated") for r in st.outliers[outlier])
    # Dendrogram order keeps each group contiguous; the map puts groups apart.
    groups_in_order = [truth[i] for i in st.order]
    assert sum(a != b for a, b in zip(groups_in_order, groups_in_order[1:])) == PLANTED["groups"]
    c = st.coords
    within = max(np.linalg.norm(c[i] - c[j]) for i in range(len(c)) for j in range(len(c)) if same[i, j])
    between = min(np.linalg.norm(c[i] - c[j]) for i in range(len(c)) for j in range(len(c))
                  if truth[i] != truth[j])
    assert within < between
    # K given, and a threshold between the within- and between-group distances, give the same partition.
    assert adjusted_rand_score(truth, collection_structure(coll, clusters=4).labels) == 1.0
    assert adjusted_rand_score(truth, collection_structure(coll, distance_threshold=0.5).labels) == 1.0


def test_shared_basis_captures_the_planted_groups(planted_collection):
    paths, _ = planted_collection
    coll = collection_similarity(paths[:-1], F64)  # the groups and the duplicate, no outlier
    at, curve = coll.shared_energy("both")
    assert at.min() >= 0.99
    # Cumulative sums of non-negative terms: monotone exactly; a fraction ≤ 1 up to the rounding of its
    # two sums of squares (length ≤ d each).
    assert bool((curve[:, 1:] >= curve[:, :-1]).all())
    assert float(curve.max()) <= 1 + 2 * gamma(PLANTED["m"] + PLANTED["n"], U64)
    # Against an independent SVD of the stacked ΔW of one module.
    ads = [load_adapter(p) for p in paths[:-1]]
    name = ads[0].names[0]
    Ds = [a[name].delta(torch.float64).numpy() for a in ads]
    R = F64.shared_rank
    Ur = np.linalg.svd(np.hstack(Ds))[0][:, :R]
    Vr = np.linalg.svd(np.vstack(Ds))[2][:R].T
    ref = np.array([np.sum((Ur.T @ D @ Vr) ** 2) / np.sum(D ** 2) for D in Ds])
    m = coll.modules[0]
    assert m.name.endswith(name.split("layers.")[-1])
    # Ours goes through the Gram of the stacked factors (squares the spectrum): the basis moves by
    # ≤ γ·σ_1²/(σ_R² − σ_{R+1}²); the captured fraction by ≤ 4× that (two bases, squared norms).
    sv = np.linalg.svd(np.hstack(Ds), compute_uv=False)
    tol = 4 * gamma(len(Ds) * PLANTED["rank"] + PLANTED["m"], U64) * sv[0] ** 2 / (sv[R - 1] ** 2 - sv[R] ** 2)
    np.testing.assert_allclose(m.energy_both[:, R - 1].numpy(), ref, atol=tol)


def test_lazy_index_reads_what_load_adapter_reads(planted_collection, llama_adapter, gpt2_adapter, bert_adapter):
    paths, _ = planted_collection
    # rank/alpha patterns (llama), fan_in_fan_out (gpt2), rsLoRA and a .bin read eagerly (bert)
    for p in (paths[0], llama_adapter[1], gpt2_adapter[1], bert_adapter[1]):
        ad, ix = load_adapter(p), index_adapter(p)
        assert list(ix.refs) == ad.names
        for m in ad:
            got = ix.read(m.name)
            assert (got.scaling, got.layout, got.shape, got.rank) == (m.scaling, m.layout, m.shape, m.rank)
            assert torch.equal(got.A, m.A) and torch.equal(got.B, m.B)


def _adapter(folder, names, m=8, n=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = [LoraModule(nm, parse_module_path(nm), torch.randn(r, n, generator=g), torch.randn(m, r, generator=g),
                       alpha=float(r), scaling=1.0) for nm in names]
    return save_peft_adapter(folder, mods)


def test_missing_modules_are_reported_and_compared_over_those_that_have_them(tmp_path):
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    a = _adapter(tmp_path / "a", [q, v], seed=1)
    b = _adapter(tmp_path / "b", [q, v], seed=2)
    c = _adapter(tmp_path / "c", [q], seed=3)
    coll = collection_similarity([a, b, c], CollectionSettings(device="cpu", dtype="float64"))
    assert coll.partial == {"layers.0.self_attn.v_proj": ["c"]}
    assert coll.common.tolist() == [[2, 2, 1], [2, 2, 1], [1, 1, 1]]
    only_q = collection_similarity([a, c], CollectionSettings(device="cpu", dtype="float64"),
                                   allow_partial=True).phi[0, 1]
    # The same module's φ from a 3-adapter and a 2-adapter Gram: the same inner products, rounded alike
    # up to the summation order (≤ 2k·γ_m per φ, k = 2, m = 8).
    assert float(coll.phi[0, 2]) == pytest.approx(float(only_q), abs=4 * gamma(8, U64))


def test_bad_collections_are_refused_naming_the_problem(tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    a = _adapter(tmp_path / "a", [q])
    b = _adapter(tmp_path / "b", [q], m=10)
    with pytest.raises(ShapeError, match="q_proj.*8×6.*10×6.*--allow-partial"):
        plan_collection([a, b])
    c = _adapter(tmp_path / "c", [q], seed=4)
    tasks, _, _, skipped = plan_collection([a, b, c], allow_partial=True)
    assert [t.members for t in tasks] == [(0, 2)] and "shapes differ" in skipped["layers.0.self_attn.q_proj"]
    with pytest.raises(ConfigError, match="at least two"):
        plan_collection([a])
    with pytest.raises(ConfigError, match="listed twice"):
        plan_collection([a, tmp_path / "a" / ".." / "a"])
    other = _adapter(tmp_path / "other", ["encoder.layer.0.attention.self.query"])
    with pytest.raises(KeyMatchError, match="no LoRA module"):
        plan_collection([a, other])


def test_dask_local_cluster_gives_the_in_process_numbers(planted_collection):
    pytest.importorskip("distributed")
    from lora_lens.dist import dask_mapper

    paths, _ = planted_collection
    st = CollectionSettings(device="cpu", dtype="float32", shared_rank=12)
    ref = collection_similarity(paths, st)
    with dask_mapper("local", workers=2, processes=False) as mapper:
        got = collection_similarity(paths, st, mapper=mapper)
    # Same function on the same files; only the thread that runs it differs. 1e-6 is the requirement
    # (the numbers here are in fact bitwise equal: same BLAS, same thread count).
    torch.testing.assert_close(got.phi, ref.phi, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.shared_energy()[1], ref.shared_energy()[1], rtol=0, atol=1e-6)


def test_unreachable_scheduler_is_bad_input_naming_the_address():
    pytest.importorskip("distributed")
    from lora_lens.dist import dask_mapper

    with pytest.raises(ConfigError, match="tcp://127.0.0.1:9"):
        with dask_mapper("tcp://127.0.0.1:9", timeout=1):
            pass


def test_peft_written_adapters_with_mixed_ranks(llama_adapter, tiny_llama, tmp_path):
    """Real PEFT files (rank_pattern: one module at r=2, the rest r=4), a byte copy, and other seeds."""
    import shutil

    from .adapter_utils import make_peft_adapter

    model, _ = tiny_llama
    src = llama_adapter[1]
    copy = shutil.copytree(src, tmp_path / "copy")
    other = tmp_path / "seed1"
    make_peft_adapter(model, other, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    coll = collection_similarity([src, copy, other], CollectionSettings(device="cpu", dtype="float64"))
    # Identical bytes → identical bases; ‖UᵀU‖²/k = 1 up to the Gram's rounding (2k·γ_d, k ≤ 4, d ≤ 64).
    assert float(coll.phi[0, 1]) == pytest.approx(1.0, abs=8 * gamma(64, U64))
    # Independent random inits: φ at the random baseline's level, far from 1.
    assert abs(float(coll.phi[0, 2]) - float(coll.random_phi[0, 2])) < 6 * float(coll.random_std[0, 2]) + 0.05
    ks = {m.name: m.ks for m in coll.modules}
    # src and its copy hold that module at r=2, the other seed at r=4: every pair with src compares k = 2.
    assert ks["layers.1.self_attn.q_proj"] == (2, 2, 4) and ks["layers.0.self_attn.q_proj"] == (4, 4, 4)
    st = collection_structure(coll)
    assert [(i, j) for i, j, _ in st.duplicates] == [(0, 1)]


def test_random_draws_are_seeded_per_item_not_per_run(planted_collection):
    """Draws are seeded by their item's name (item_seed): alone or in a run, first or last, the same."""
    from lora_lens.compare.collection import module_task
    from lora_lens.compute import Compute

    paths, _ = planted_collection
    st = CollectionSettings(compute=Compute(device="cpu", seed=3), shared_rank=6)
    tasks = plan_collection(paths, st)[0]
    whole = collection_similarity(paths, st).modules
    for task in (tasks[-1], tasks[0]):  # out of order, one at a time
        alone = module_task(task)
        got = next(m for m in whole if m.name == task.name)
        assert alone.random == got.random
        torch.testing.assert_close(alone.energy_both, got.energy_both, rtol=0, atol=0)
    # The baseline is an item of its own, (d, k): one for all modules of a shape; the run's seed moves it.
    same = [m for m in whole if m.shape == whole[0].shape]
    assert len(same) >= 2 and same[0].random == same[1].random
    other = module_task(plan_collection(paths, CollectionSettings(compute=Compute(device="cpu", seed=4)))[0][0])
    assert other.random["out"] != whole[0].random["out"]


def test_headers_are_cached_until_the_weights_file_changes(tmp_path):
    """index_once reuses a header within a process, and rereads it when the weights file is rewritten in place."""
    import os

    from lora_lens.io.lazy import index_once

    names = ["model.layers.0.self_attn.q_proj"]
    folder = _adapter(tmp_path / "a", names, r=2)
    first = index_once(folder)
    assert index_once(str(folder)) is first  # same file, same stamp: parsed once
    weights = folder / "adapter_model.safetensors"
    stamp = os.stat(folder).st_mtime_ns
    _adapter(tmp_path / "b", names, r=3)
    weights.write_bytes((tmp_path / "b" / "adapter_model.safetensors").read_bytes())  # in place: same inode
    os.utime(folder, ns=(stamp, stamp))  # the folder's own stamp unchanged, as an in-place write leaves it
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    assert index_once(folder).refs[names[0]].rank == 3


def test_headers_are_reread_when_a_file_is_replaced_keeping_the_newest_mtime(tmp_path):
    """A weights file replaced by another with an older (or the same) mtime, as ``rsync -a`` / ``cp -p`` or a
    rewrite within the timestamp granularity leave it: the newest stamp of the folder is unchanged, so a key of
    mtimes alone served the stale header; its size and inode say it changed."""
    import os
    import shutil

    from lora_lens.io.lazy import index_once

    names = ["model.layers.0.self_attn.q_proj"]
    folder = _adapter(tmp_path / "a", names, r=2)
    weights = folder / "adapter_model.safetensors"
    old = os.stat(weights).st_mtime_ns
    assert index_once(folder).refs[names[0]].rank == 2
    _adapter(tmp_path / "b", names, r=3)
    shutil.copy2(tmp_path / "b" / "adapter_model.safetensors", tmp_path / "new.safetensors")
    os.utime(tmp_path / "new.safetensors", ns=(old, old))  # the copy keeps an mtime no newer than the old file's
    stamps = {p: os.stat(p).st_mtime_ns for p in (folder, folder / "adapter_config.json")}
    os.replace(tmp_path / "new.safetensors", weights)
    for p, t in stamps.items():
        os.utime(p, ns=(t, t))
    assert index_once(folder).refs[names[0]].rank == 3


def test_block_triangle_gram_equals_the_full_product():
    """_gram (upper block triangle, mirrored) vs X.T @ X in float64: every entry, mirrored ones included, an
    inner product of length d, so within γ_d·|x_i|ᵀ|x_j| of the float32 result (Higham, any summation order)."""
    from lora_lens.compare.collection_kernel import _GRAM_BLOCK, _gram

    g = torch.Generator().manual_seed(0)
    d = 96
    for c in (2 * _GRAM_BLOCK - 1, 2 * _GRAM_BLOCK + 37, 5 * _GRAM_BLOCK):  # one GEMM; ragged blocks; 5 blocks
        X = torch.randn(d, c, generator=g)
        G = _gram(X)
        assert G.shape == (c, c)
        ref = X.double().T @ X.double()
        bound = gamma(d) * (X.double().abs().T @ X.double().abs())
        assert bool(((G.double() - ref).abs() <= bound).all())


def test_norm_outliers_read_sensibly_when_the_others_agree_exactly():
    """Four adapters of equal norm (MAD 0), one with ΔW = 0 and one 10× larger (found by review: the
    robust z divided by a MAD of 0 and printed 'robust z = +1004770432978.8'): the zero update is named
    as such, the large one by its value against the median, and no z is invented."""
    from types import SimpleNamespace

    N = 6
    g = np.random.default_rng(0)
    phi = np.clip(0.5 + 0.1 * g.standard_normal((N, N)), 0, 1)
    phi = 0.5 * (phi + phi.T)
    np.fill_diagonal(phi, 1.0)
    coll = SimpleNamespace(size=N, phi=torch.from_numpy(phi), random_phi=torch.zeros(N, N),
                           random_std=torch.zeros(N, N),
                           norms=torch.tensor([2.0, 2.0, 2.0, 2.0, 0.0, 20.0], dtype=torch.float64),
                           effective_rank=torch.tensor([4.0, 4.0, 4.0, 4.0, 0.0, 4.0], dtype=torch.float64))
    st = collection_structure(coll, clusters=2)
    assert sorted(st.outliers) == [4, 5]
    assert st.outliers[4] == ["zero update: ‖ΔW‖ = 0 (an untrained or init-only adapter?)"]
    assert st.outliers[5] == ["norm 20 against the collection's median 2 (MAD 0: the others agree exactly)"]


def test_bases_collected_a_few_adapters_at_a_time_change_nothing(planted_collection, monkeypatch):
    """The factored SVDs run SVD_GROUP adapters at a time (to bound their transient memory): groups of 3
    give the numbers of one group of all 14 (each item's QR/SVD is its own; only batching differs)."""
    from lora_lens.compare import collection_kernel

    paths, _ = planted_collection
    monkeypatch.setattr(collection_kernel, "SVD_GROUP", len(paths))
    whole = collection_similarity(paths, F64)
    monkeypatch.setattr(collection_kernel, "SVD_GROUP", 3)
    parts = collection_similarity(paths, F64)
    torch.testing.assert_close(parts.phi, whole.phi, rtol=0, atol=1e-12)
    a, b = whole.shared_energy("both")[0], parts.shared_energy("both")[0]
    torch.testing.assert_close(torch.as_tensor(b), torch.as_tensor(a), rtol=0, atol=1e-12)
