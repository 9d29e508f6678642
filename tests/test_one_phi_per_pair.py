"""One φ per pair (issue 20 item 9): `similarity A B`, `collection A B` and A, B inside a larger collection
with a lower-rank adapter give the same number, on every side; the baseline uses the same k and side."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_lens.compare import adapter_similarity, pairwise_similarity
from lora_lens.compare.collection import CollectionSettings, collection_similarity
from lora_lens.compare.subspaces import SIDE_WHY, resolve_side
from lora_lens.errors import ConfigError
from lora_lens.io import load_adapter, save_peft_adapter
from lora_lens.keys import parse_module_path
from lora_lens.linalg import random_phi_expectation
from lora_lens.types import LoraModule

from .cli_utils import run
from .tolerances import U64, gamma

NAMES = [f"model.layers.{b}.self_attn.{t}" for b in range(2) for t in ("q_proj", "v_proj")]
M, N = 24, 20


def _adapter(folder, r, seed, share_a_with=None):
    """Random factors; ``share_a_with`` (a seed): A drawn from that seed's generator, as two runs of one init
    seed share A at step 0 — their input sides coincide while their output sides are unrelated."""
    g = torch.Generator().manual_seed(seed)
    ga = torch.Generator().manual_seed(share_a_with) if share_a_with is not None else g
    mods = []
    for nm in NAMES:
        A = torch.randn(r, N, generator=ga, dtype=torch.float64)
        B = torch.randn(M, r, generator=g, dtype=torch.float64)
        mods.append(LoraModule(nm, parse_module_path(nm), A, B, alpha=float(r), scaling=1.0))
    return save_peft_adapter(folder, mods, dtype=torch.float64)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("trio")
    return _adapter(root / "a", 8, 1), _adapter(root / "b", 8, 2), _adapter(root / "c", 4, 3)


def _reference(pa, pb, side, top_k=None):
    """Mean over modules of φ from materialized ΔW and numpy's float64 SVD, k = min(r_a, r_b[, top_k])."""
    a, b = load_adapter(pa), load_adapter(pb)
    vals = []
    for name in a.names:
        per = {}
        for sd in ("out", "in"):
            bases = []
            for x in (a[name], b[name]):
                u, _, vh = np.linalg.svd(x.delta(torch.float64).numpy())
                bases.append((u if sd == "out" else vh.T, x.rank))
            k = min(bases[0][1], bases[1][1], top_k or 10 ** 9)
            per[sd] = np.sum((bases[0][0][:, :k].T @ bases[1][0][:, :k]) ** 2) / k
        vals.append(per[side] if side != "both" else 0.5 * (per["out"] + per["in"]))
    return float(np.mean(vals))


@pytest.mark.parametrize("side", ["out", "in", "both"])
def test_pair_phi_is_the_same_in_similarity_and_in_any_collection(trio, side):
    a, b, c = trio
    st = CollectionSettings(device="cpu", dtype="float64", side=side)
    two = collection_similarity([a, b], st)
    three = collection_similarity([c, a, b], st)  # the r=4 adapter first: it must not pull k down for (a, b)
    sim = adapter_similarity(load_adapter(a), load_adapter(b), side=side, dtype="float64")
    ref = _reference(a, b, side)
    # Same bases, Grams of 2 or 3 adapters: round-off only (2k·γ_d per φ, k = 8, d ≤ 24).
    tol = 4 * 8 * gamma(M, U64)
    assert float(two.phi[0, 1]) == pytest.approx(ref, abs=tol)
    assert float(three.phi[1, 2]) == pytest.approx(float(two.phi[0, 1]), abs=tol)
    assert sim.summary()["phi"] == pytest.approx(float(two.phi[0, 1]), abs=tol)
    # The r=4 adapter's pairs compare k = 4, and match similarity on them too.
    sim_ca = adapter_similarity(load_adapter(c), load_adapter(a), side=side, dtype="float64")
    assert float(three.phi[0, 1]) == pytest.approx(sim_ca.summary()["phi"], abs=tol)
    assert float(three.phi[0, 1]) == pytest.approx(_reference(c, a, side), abs=tol)
    assert all(m.ks == (4, 8, 8) for m in three.modules) and three.modules[0].pair_k.tolist() == [
        [4, 4, 4], [4, 8, 8], [4, 8, 8]]
    # Baselines: the same k and side as the number: expected k/d per side (mean of both for "both").
    exp = {"out": lambda k: k / M, "in": lambda k: k / N, "both": lambda k: 0.5 * (k / M + k / N)}[side]
    for i, j, k in ((1, 2, 8), (0, 1, 4)):
        assert float(three.modules[0].random_on(side)[2][i, j]) == pytest.approx(exp(k))
        assert float(three.random_phi[i, j]) == pytest.approx(exp(k), abs=0.1)
    assert sim.summary()["expected_phi"] == pytest.approx(exp(8))
    assert sim.side == side and two.to_dict()["side"] == side


def test_top_k_is_per_pair_and_capped_at_the_pair_ranks(trio):
    a, b, c = trio
    st = CollectionSettings(device="cpu", dtype="float64", top_k=6)
    coll = collection_similarity([a, b, c], st)
    tol = 4 * 8 * gamma(M, U64)
    with pytest.warns(UserWarning, match="k=6 exceeds"):  # c has rank 4 < 6: clipped there, with a warning
        sims = pairwise_similarity([load_adapter(p) for p in (a, b, c)], k=6, dtype="float64")
    for (i, j), s in zip(((0, 1), (0, 2), (1, 2)), sims):
        assert float(coll.phi[i, j]) == pytest.approx(s.summary()["phi"], abs=tol)
    assert float(coll.phi[0, 1]) == pytest.approx(_reference(a, b, "out", top_k=6), abs=tol)
    assert float(coll.phi[0, 2]) == pytest.approx(_reference(a, c, "out", top_k=6), abs=tol)
    assert any("top_k=6 exceeds the smallest rank" in n for n in coll.notes)


def test_default_side_is_out_everywhere_and_says_why(trio, tmp_path):
    import inspect

    from lora_lens.analysis import analyze_adapters
    from lora_lens.compare import layer_similarity

    assert CollectionSettings().side == "out" and resolve_side("delta", None) == "out"
    for fn in (adapter_similarity, pairwise_similarity, layer_similarity, analyze_adapters):
        assert inspect.signature(fn).parameters["side"].default is None  # None → DEFAULT_SIDE["delta"] = out
    assert resolve_side("delta", "left") == "out" and resolve_side("delta", "right") == "in"  # old names
    with pytest.raises(ConfigError, match="side"):
        CollectionSettings(side="up")
    a, b, _ = trio
    r = run("similarity", a, b, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "side out" in r.stdout and SIDE_WHY in r.stdout
    r = run("collection", a, b, "-o", tmp_path / "c", "--device", "cpu", "-q", "--json")
    assert r.exit_code == 0, r.output
    import json

    d = json.loads(r.stdout)
    assert d["side"] == "out" and SIDE_WHY in d["side_note"]
    r = run("report", a, b, "-o", tmp_path / "r", "--side", "in", "--json", "-q")
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    pairs = res.get("pairs") or res["data"]["pairs"]
    assert pairs[0]["side"] == "in"


def test_shared_init_clusters_on_the_input_side_not_on_the_output_side(tmp_path):
    """Why the default is out: two adapters of one init seed (same A, different B, as after a few steps)
    look alike on the input side whatever they learned; the output side shows they are unrelated."""
    a = _adapter(tmp_path / "a", 4, 10, share_a_with=99)
    b = _adapter(tmp_path / "b", 4, 11, share_a_with=99)
    s_in = adapter_similarity(load_adapter(a), load_adapter(b), side="in", dtype="float64").summary()
    s_out = adapter_similarity(load_adapter(a), load_adapter(b), side="out", dtype="float64").summary()
    assert s_in["phi"] == pytest.approx(1.0)  # the same A: the same row space
    assert abs(s_out["phi"] - random_phi_expectation(4, 4, M)) < 0.3


def test_side_both_of_one_adapter_and_of_a_pair_combines_the_two_sides(trio):
    from lora_lens.compare import layer_similarity

    a, b, _ = trio
    ad, bd = load_adapter(a), load_adapter(b)
    grids = {sd: layer_similarity(ad, side=sd, dtype="float64").grids for sd in ("out", "in", "both")}
    for go, gi, gb in zip(grids["out"], grids["in"], grids["both"]):
        assert (gb.dim, gb.dim_in) == (M, N) and go.names == gi.names == gb.names
        torch.testing.assert_close(gb.phi, (go.phi + gi.phi) / 2, rtol=0, atol=1e-15)
        torch.testing.assert_close(gb.expected_phi, (go.expected_phi + gi.expected_phi) / 2, rtol=0, atol=1e-15)
    pair = {sd: adapter_similarity(ad, bd, side=sd, dtype="float64").modules[0] for sd in ("out", "in", "both")}
    o, i, both = pair["out"], pair["in"], pair["both"]
    assert both.phi == pytest.approx((o.phi + i.phi) / 2, abs=1e-15)
    assert both.grassmann == pytest.approx(float(np.hypot(o.grassmann, i.grassmann)), abs=1e-12)
    assert both.angles_deg.shape == (16,) and bool((both.angles_deg.diff() >= 0).all())
    assert both.baseline.expected_phi == pytest.approx((8 / M + 8 / N) / 2)
    assert both.to_dict()["dim_in"] == N
