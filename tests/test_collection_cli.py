"""``lora-lens collection``: the folder it writes, --write-basis, report on a collection, bad input (exit 2)."""

from __future__ import annotations

import json

import torch

from lora_lens import __version__, load_adapter
from lora_lens.io import read_init_description

from .cli_utils import run
from .adapter_utils import PLANTED


def bad_input(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    assert all(n in lines[0] for n in needles), lines[0]


def test_collection_folder_basis_and_report(planted_collection, tmp_path):
    paths, truth = planted_collection
    listing = tmp_path / "list.txt"
    listing.write_text("# the planted collection\n" + "\n".join(map(str, paths)) + "\n\n")
    R = PLANTED["groups"] * PLANTED["rank"]
    out, basis = tmp_path / "coll", tmp_path / "basis"
    r = run("collection", "--list", listing, "-o", out, "--shared-rank", R, "--write-basis", basis,
            "--duplicate", 0.9999, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d == json.loads((out / "collection.json").read_text())
    N = len(paths)
    assert d["lora_lens_version"] == __version__ and d["settings"]["shared_rank"] == R
    assert [a["label"] for a in d["adapters"]] == [p.name for p in paths]
    assert len(d["phi"]) == N and len(d["structure"]["coords"]) == N
    assert len(d["structure"]["clusters"]["labels"]) == N
    assert [(x["a"], x["b"]) for x in d["structure"]["near_duplicates"]] == [(paths[0].name, paths[-2].name)]
    assert [o["adapter"] for o in d["structure"]["outliers"]] == [paths[-1].name]
    assert sorted(p.name for p in (out / "report" / "figures").iterdir()) == [
        "01-collection-heatmap.png", "02-collection-map.png", "03-collection-energy.png"]
    # The CoRA init: orthonormal B (m, R) per module, A = 0, described as CoRA.
    ad = load_adapter(basis)
    assert len(ad) == PLANTED["layers"] * 2 and read_init_description(basis).method == "cora"
    for m in ad:
        assert m.rank == R and not m.A.any()
        torch.testing.assert_close(m.B.T @ m.B, torch.eye(R), atol=1e-5, rtol=0)
    rep = tmp_path / "rep"
    r = run("report", out, "-o", rep)
    assert r.exit_code == 0, r.output
    assert "Collection" in (rep / "index.html").read_text()


def test_collection_bad_input(planted_collection, tmp_path):
    paths, _ = planted_collection
    out = tmp_path / "o"
    bad_input(run("collection", "-o", out), "no adapters")
    bad_input(run("collection", paths[0], "-o", out), "at least two")
    bad_input(run("collection", paths[0], paths[0], "-o", out), "listed twice")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    bad_input(run("collection", "--list", empty, "-o", out), "empty.txt", "names no adapter")
    bad_input(run("collection", "--list", tmp_path / "missing.txt", "-o", out), "missing.txt")
    bad_input(run("collection", paths[0], tmp_path / "nope", "-o", out), "nope")
    bad_input(run("collection", paths[0], paths[1], "-o", out, "--clusters", "x"), "--clusters")
    assert not out.exists()  # nothing half-written
