"""``lora-lens report`` and ``lora-lens demo`` end to end (small sizes)."""

import json
from html.parser import HTMLParser

import pytest


from .cli_utils import assert_stamped, run


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.headings, self._in_h2 = [], [], False

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        self._in_h2 = tag == "h2"

    def handle_data(self, data):
        if self._in_h2 and data.strip():
            self.headings.append(data.strip())
            self._in_h2 = False


def test_report_two_adapters_with_base(llama_adapter, tiny_llama, tmp_path, monkeypatch):
    import shutil

    import lora_lens_cli.common

    second = tmp_path / "second"
    shutil.copytree(llama_adapter[1], second)
    monkeypatch.setattr(lora_lens_cli.common, "_isatty", lambda stream: True)  # as on a terminal: a progress bar
    r = run("report", llama_adapter[1], second, "--base", tiny_llama[1], "-o", tmp_path / "rep", "--json")
    assert r.exit_code == 0, r.output
    assert "analysing" in r.stderr  # the bar; stdout stays one JSON object
    out = json.loads(r.stdout)
    index = tmp_path / "rep" / "index.html"
    assert out["report"] == str(index) and index.is_file()
    p = _Collect()
    p.feed(index.read_text())
    assert any(h.startswith("Alignment with W0") for h in p.headings)
    assert "Adapter vs adapter" in p.headings
    assert p.imgs and all(src.startswith("data:image/png;base64,") for src in p.imgs)
    data = json.loads((tmp_path / "rep" / "results.json").read_text())["data"]
    # an adapter compared with an identical copy: φ = 1 on every module
    pair = data["pairs"][0]
    assert all(m["phi"] == pytest.approx(1.0, abs=1e-5) for m in pair["modules"])
    assert data["adapters"][0]["alignment"]["alignment"]["modules"]
    # refuses to overwrite without --overwrite, and says so in one line
    r = run("report", llama_adapter[1], "-o", tmp_path / "rep")
    assert r.exit_code == 2 and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_report_bad_adapter_path(tmp_path):
    r = run("report", tmp_path / "missing", "-o", tmp_path / "rep")
    assert r.exit_code == 2 and "missing" in r.stderr
    assert not (tmp_path / "rep").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.realmodel
def test_demo_runs_end_to_end_small(minilm_path, tmp_path):
    r = run("demo", "-o", tmp_path / "demo", "--steps", "3", "--rank", "4", "--json")
    assert r.exit_code == 0, r.output
    out = assert_stamped(json.loads(r.stdout), "demo")
    assert set(out["adapters"]) == {"lora-seed0", "lora-seed1", "cora-frozen", "condlora"}
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    summary = assert_stamped(json.loads((tmp_path / "demo" / "demo.json").read_text()), "demo_run")
    assert summary["rank"] == 4 and set(summary["eval_loss"]) == set(out["adapters"])


def test_reduce_and_report_refuse_to_overwrite_their_input(llama_adapter, tmp_path):
    import shutil

    ad = tmp_path / "nest" / "ad"
    shutil.copytree(llama_adapter[1], ad)
    (tmp_path / "nest" / "notes.txt").write_text("keep")
    for args in (["reduce", ad, "--rank", "1", "-o", tmp_path / "nest", "--overwrite"],
                 ["report", ad, "-o", ad, "--overwrite"]):
        r = run(*args)
        assert r.exit_code == 2 and "holds an input" in r.stderr, r.output
    assert (ad / "adapter_model.safetensors").is_file() and (tmp_path / "nest" / "notes.txt").is_file()


def test_demo_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    r = run("demo", "-o", tmp_path)
    assert r.exit_code == 2 and "demo.json" in r.stderr and (tmp_path / "mine.txt").is_file()


def test_report_summary_leads_with_findings_then_the_table(llama_adapter, tiny_llama, tmp_path):
    """3–5 sentences first (the most-changed modules named from ΔW in float64, effective ranks, φ against its
    random baseline, alignment), then one table row per adapter × module type with the numbers."""
    import re
    import shutil

    import torch

    from lora_lens import load_adapter
    from lora_lens.analysis import analyze_adapters
    from lora_lens.report.analysis import analysis_report
    from lora_lens.report.html import render_html

    second = tmp_path / "second"
    shutil.copytree(llama_adapter[1], second)
    adapter = load_adapter(llama_adapter[1])
    an = analyze_adapters([adapter, load_adapter(second)], tiny_llama[1], device="cpu")
    report = analysis_report(an)
    findings = report.bullets
    assert 3 <= len(findings) <= 5, findings
    assert all(f[0].isupper() and f.endswith(".") and len(f.split()) >= 8 for f in findings), findings
    norms = {m.name: float(torch.linalg.matrix_norm(m.delta(torch.float64))) for m in adapter.modules}
    top = max(norms, key=norms.get)
    assert f"largest update is in {top} in both adapters" in findings[0]  # found from ΔW in float64
    single = analysis_report(analyze_adapters([adapter], device="cpu")).bullets
    assert 2 <= len(single) <= 5 and f"{top} ({norms[top]:.3g})" in single[0]  # by name and size
    assert "effective rank" in findings[1] and "nominal r = 4" in findings[1]
    assert any("for random subspaces" in f for f in findings) and any("intruder" in f for f in findings)
    (rows,) = [t.rows for t in report.summary_tables if t.header[1] == "module type"]
    types = set(an.adapters[0].spectra.summary)  # self_attn.q_proj, …
    assert len(rows) == 2 * len(types) and {r[1] for r in rows} == types
    page = render_html(report)
    summary = page[page.index('<section id="summary">'):]
    assert summary.index(findings[0][:20]) < summary.index("<table>") < summary.index("</section>")
    assert len(re.findall("<li>", summary[:summary.index("</section>")])) == len(findings)
