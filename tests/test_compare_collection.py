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

from .conftest import PLANTED

F64 = CollectionSettings(device="cpu", dtype="float64", shared_rank=PLANTED["groups"] * PLANTED["rank"])


def _reference_phi(paths, k):
    """Pairwise φ from materialized ΔW and a full float64 SVD each (the naive way), mean over modules."""
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
                out[i, j] += 0.5 * (np.sum((U[i].T @ U[j]) ** 2) + np.sum((V[i].T @ V[j]) ** 2)) / k
    return out / len(ads[0].names)


def test_phi_matches_the_naive_pairwise_reference(planted_collection):
    paths, _ = planted_collection
    coll = collection_similarity(paths, F64)
    ref = _reference_phi(paths, PLANTED["rank"])
    # float64 throughout: unit round-off 1e-16 × a few hundred flops per entry; 1e-10 leaves room for
    # the SVD's own backward error on well-separated singular values.
    np.testing.assert_allclose(coll.phi.numpy(), ref, atol=1e-10)
    # Left side needs p·r = 56 > m = 40 (F Fᵀ and blocked Gram), right side p·r ≤ n = 56 (one Gram): both paths ran.
    assert len(paths) * PLANTED["rank"] > PLANTED["m"] and len(paths) * PLANTED["rank"] <= PLANTED["n"]


def test_float32_and_row_blocks_agree_with_float64(planted_collection):
    paths, _ = planted_collection
    ref = collection_similarity(paths, F64).phi
    small = CollectionSettings(device="cpu", dtype="float32", max_memory=1, shared_rank=F64.shared_rank)
    got = collection_similarity(paths, small).phi
    # φ sums k² ≤ 16 squared cosines ≤ 1 each from products of length d ≤ 56 of unit vectors: error
    # ≲ k·d·u₃₂ ≈ 16·56·6e-8 ≈ 5e-5 per module; the QR/SVD of the factors adds a few u·κ of the
    # cores (κ ≲ 1e2 here). 1e-4 is that bound, not a measured number.
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4)


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
    assert bool((curve[:, 1:] >= curve[:, :-1] - 1e-12).all()) and float(curve.max()) <= 1 + 1e-9
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
    np.testing.assert_allclose(m.energy_both[:, R - 1].numpy(), ref, atol=1e-8)


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
    assert float(coll.phi[0, 2]) == pytest.approx(float(only_q), abs=1e-12)


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
    # Same function on the same files; only the thread that runs it differs.
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

    from .conftest import make_peft_adapter

    model, _ = tiny_llama
    src = llama_adapter[1]
    copy = shutil.copytree(src, tmp_path / "copy")
    other = tmp_path / "seed1"
    make_peft_adapter(model, other, seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    coll = collection_similarity([src, copy, other], CollectionSettings(device="cpu", dtype="float64"))
    assert float(coll.phi[0, 1]) == pytest.approx(1.0, abs=1e-12)
    # Independent random inits: φ at the random baseline's level, far from 1.
    assert abs(float(coll.phi[0, 2]) - float(coll.random_phi[0, 2])) < 6 * float(coll.random_std[0, 2]) + 0.05
    ks = {m.name: m.k for m in coll.modules}
    assert ks["layers.1.self_attn.q_proj"] == 2 and ks["layers.0.self_attn.q_proj"] == 4
    st = collection_structure(coll)
    assert [(i, j) for i, j, _ in st.duplicates] == [(0, 1)]
