"""The worked-example notebooks run top to bottom and still do their job.

Each notebook's code cells are executed in order, in one fresh namespace, by
``scripts/run_notebook.py`` (plain ``exec``, no Jupyter kernel), in SMALL mode
(``LORA_LENS_NOTEBOOK_SMALL=1``: tiny step counts), from a temporary working
folder, with the notebook's ``tempfile.mkdtemp()`` outputs under pytest's
``tmp_path``. Then a few key results are checked in the namespace, so a
notebook that silently stopped computing something fails here. Each takes
about 10 s on one CPU thread (training on the real stories260K / MiniLM; 04: three MiniLM runs on WordNet).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
sys.path.insert(0, str(ROOT / "scripts"))

from run_notebook import code_cells, run_notebook  # noqa: E402

EXPECTED = ["01_analyze_an_adapter.ipynb", "02_cora_condlora.ipynb", "03_papers_on_real_weights.ipynb",
            "04_compare_methods.ipynb"]
VERDICTS = {"holds", "partly", "does not hold"}


def test_notebooks_are_committed_clean():
    """nbformat 4, code/markdown cells only, a markdown cell first, no stored outputs, plain Python code."""
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = json.loads(path.read_text(encoding="utf-8"))
        assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["language"] == "python", path.name
        cells = nb["cells"]
        assert cells[0]["cell_type"] == "markdown", f"{path.name}: should open with what it shows"
        assert {c["cell_type"] for c in cells} == {"code", "markdown"}, path.name
        for c in cells:
            if c["cell_type"] == "code":
                assert c["outputs"] == [] and c["execution_count"] is None, f"{path.name}: clear the outputs"
        assert code_cells(path), path.name  # raises on %magic / !shell lines


@pytest.fixture
def run(tmp_path, monkeypatch):
    """Run a notebook in SMALL mode; returns (its namespace, the tmp folder its outputs went to)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() inside the notebook lands here
    work = tmp_path / "cwd"
    work.mkdir()
    before = sorted(p.name for p in NOTEBOOKS.iterdir())

    def _run(name: str) -> dict:
        ns = run_notebook(NOTEBOOKS / name, workdir=work, small=True)
        assert ns["SMALL"] is True
        assert Path(ns["OUT"]).is_relative_to(tmp_path), "notebook outputs must go to a temporary folder"
        assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before, "a notebook wrote into the repository"
        return ns

    return _run


def _trained(result) -> bool:
    return math.isfinite(result.eval_loss) and result.eval_loss < result.eval_loss_before


@pytest.mark.slow
@pytest.mark.realmodel
def test_01_analyze_an_adapter(run):
    ns = run("01_analyze_an_adapter.ipynb")
    assert _trained(ns["result"])
    spectra = ns["spectra"]
    assert len(spectra.layers) == 20 and set(spectra.summary) == set(ns["adapter"].module_types)
    assert all(0 < r.effective_rank <= 8 and r.singular_values[0] > 0 for r in spectra.layers)
    assert [tuple(g.phi.shape) for g in ns["layers"].grids] == [(5, 5)] * 4
    assert len(ns["al"].modules) == len(ns["intr"].modules) == 20
    assert len(ns["intr"].totals) == len(ns["EPSILONS"])
    assert ns["report"].is_file() and ns["report"].name == "index.html"
    assert type(ns["fig"]).__name__ == "Figure"


@pytest.mark.slow
@pytest.mark.realmodel
def test_02_cora_condlora(run):
    ns = run("02_cora_condlora.ipynb")
    runs = ns["runs"]
    assert list(runs) == ["lora", "cora-frozen", "cora-init", "condlora"]
    assert all(_trained(r) for r in runs.values())
    lora = runs["lora"].trainable_parameters
    assert runs["cora-init"].trainable_parameters == lora
    assert runs["cora-frozen"].trainable_parameters < lora and runs["condlora"].trainable_parameters < lora / 4
    assert ns["frozen_ok"] is True
    assert set(ns["similarity"]) == {"cora-frozen", "cora-init", "condlora"}
    assert all(len(s.modules) == 10 for s in ns["similarity"].values())
    assert len(ns["findings"]) == 3 and set(ns["findings"].values()) <= VERDICTS


@pytest.mark.slow
@pytest.mark.realmodel
def test_03_papers_on_real_weights(run, minilm_path):
    ns = run("03_papers_on_real_weights.ipynb")
    assert len(ns["rank_grids"]) == len(ns["seed_grids"]) == 10
    assert {g.shape for g in ns["rank_grids"].values()} == {(2, 8)}
    assert {g.shape for g in ns["seed_grids"].values()} == {(8, 8)}
    assert all(((g >= -1e-6) & (g <= 1 + 1e-6)).all() for g in ns["seed_grids"].values())
    cond = ns["condlora"]
    assert [len(g.blocks) for g in cond["MiniLM"].grids] == [6] * 4  # query/value × C_A/C_B, 6 layers
    assert all(g.structural.shape == g.phi.shape for a in cond.values() for g in a.grids)  # both baselines
    models = ("MiniLM", "stories260K")
    keys = {"lora_7.2_ranks", "lora_7.2_seeds", "lora_7.3_correlated", "lora_7.3_not_top", "lora_7.3_rank",
            "intruders_exist", "intruders_rank"}
    keys |= {f"condlora_{what}_{m}" for what in ("gaussian", "structure", "deep") for m in models}
    assert set(ns["findings"]) == keys and set(ns["findings"].values()) <= VERDICTS


@pytest.mark.slow
@pytest.mark.realmodel
def test_04_compare_methods(run, minilm_path):
    ns = run("04_compare_methods.ipynb")
    results = ns["results"]
    assert results["task"] == "classify" and results["metric"] == "accuracy"
    assert [s["method"] for s in results["summary"]] == ns["METHODS"] == ["lora", "condlora", "head-only"]
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [(m, 0) for m in ns["METHODS"]]  # SMALL: 1 seed
    assert all(0 <= r["eval_accuracy"] <= 1 and r["steps"] == ns["STEPS"] for r in results["runs"])
    assert [c["key"] for c in ns["claims"]] == ["condlora", "control"]  # only the claims these methods cover
    assert {c["outcome"] for c in ns["claims"]} <= {"holds", "does not hold", "inconclusive"}
    assert {p.name for p in ns["RESULTS"].iterdir()} >= {"results.json", "results.md", "metric_vs_parameters.png",
                                                        "loss_curves.png", "runs"}
    assert type(ns["fig"]).__name__ == "Figure"
