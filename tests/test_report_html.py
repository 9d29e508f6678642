"""The HTML report: escaping, embedded and linked PNGs, well-formed structure, JSON, atomic writes."""

from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_lens.errors import ConfigError
from lora_lens.jsonable import to_jsonable
from lora_lens.report import (Report, ReportFigure, ReportSection, ReportTable, new_figure, render_html,
                               write_report)
from lora_lens.report.figures import PNG_SIGNATURE, figure_to_png_bytes

EVIL = "<script>alert('x')</script> & \"quotes\""
VOID = {"meta", "img", "br", "hr", "link", "input"}


def _fig(title="t"):
    fig, ax = new_figure(size=(2, 1.5))
    ax.plot([0, 1], [1, 0])
    ax.set_title(title)
    return fig


def _spec(fig=None):
    png = figure_to_png_bytes(_fig("png"), dpi=30)
    return Report(
        f"Report {EVIL}", "sub", [f"bullet {EVIL}"], [(f"key {EVIL}", 0.123456), ("n", 3), ("nan", float("nan"))],
        [ReportSection(f"Spectra {EVIL}", f"para one {EVIL}\n\npara two",
                       [ReportFigure(fig or _fig(), f"cap {EVIL}", "sv"), ReportFigure(png, "from bytes")],
                       [ReportTable(["layer", f"h {EVIL}"], [[0, np.float32(1.5)], [1, EVIL]], "t")]),
         ReportSection("Spectra", ["a", "b"])],  # same slug as above: needs its own anchor
    )


class Checker(HTMLParser):
    """Fails on mis-nested or unclosed tags; collects ids, links, images and visible text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.ids, self.hrefs, self.imgs, self.text, self.errors = [], set(), [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            assert a["id"] not in self.ids, f"duplicate id {a['id']}"
            self.ids.add(a["id"])
        if tag == "a":
            self.hrefs.append(a["href"])
        if tag == "img":
            self.imgs.append(a)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(page: str) -> Checker:
    c = Checker()
    c.feed(page)
    c.close()
    assert c.errors == [] and c.stack == [], (c.errors, c.stack)
    return c


def test_render_escapes_all_text_and_is_well_formed():
    page = render_html(_spec(), dpi=30)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page  # every EVIL string was escaped
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in page
    c = _parse(page)
    text = "".join(c.text)
    assert text.count(EVIL) >= 7  # title ×2, bullet, key, heading ×2 (toc), paragraph, caption, header, cell
    assert "para one" in text and "para two" in text
    # table of contents: every in-page link points at an id that exists
    anchors = [h[1:] for h in c.hrefs if h.startswith("#")]
    assert anchors and all(a in c.ids for a in anchors)
    assert len({a for a in anchors}) == 3  # summary + two sections, distinct
    # no external resources: only data URIs, in-page anchors and figures/ links
    assert all(i["src"].startswith("data:image/png;base64,") for i in c.imgs)
    assert all(h.startswith("#") or h.startswith("figures/") for h in c.hrefs)
    assert "http://" not in page and "https://" not in page


def test_images_are_embedded_pngs_and_cells_formatted():
    c = _parse(render_html(_spec(), dpi=30))
    assert len(c.imgs) == 2
    for img in c.imgs:
        png = base64.b64decode(img["src"].split(",", 1)[1])
        assert png.startswith(PNG_SIGNATURE)
    text = "".join(c.text)
    assert "0.1235" in text and "1.5" in text and "—" in text  # 4 significant digits, numpy scalar, NaN
    assert "Figure 1." in text and "Figure 2." in text


def test_bad_pieces_are_refused_when_built():
    with pytest.raises(ConfigError, match=r"report figure 'plot': got str; expected a matplotlib Figure or PNG"):
        ReportFigure("plot.png", "plot")
    with pytest.raises(ConfigError, match=r"report figure .*got bytes"):
        ReportFigure(b"GIF89a", "not a png")
    with pytest.raises(ConfigError, match=r"report table 'c': rows of lengths \[1, 2\]"):
        ReportTable(["a"], [[1, 2]], "c")
    with pytest.raises(ConfigError, match="expected a lora_lens.report.Report"):
        write_report("unused", {"title": "x"})


def test_write_report_files_links_and_json(tmp_path):
    out = tmp_path / "rep"
    data = {"phi": np.eye(2), "S": torch.tensor([2.0, 1.0]), "bad": float("inf"), "n": np.int64(3), "t": (1, 2)}
    index = write_report(out, _spec(), json_data=data, dpi=30)
    assert index == out / "index.html"
    names = sorted(p.name for p in (out / "figures").iterdir())
    assert names == ["01-sv.png", "02-from-bytes.png"]
    assert all((out / "figures" / n).read_bytes().startswith(PNG_SIGNATURE) for n in names)
    c = _parse(index.read_text(encoding="utf-8"))
    assert sorted(h for h in c.hrefs if h.startswith("figures/")) == [f"figures/{n}" for n in names]
    res = json.loads((out / "results.json").read_text())
    assert res["kind"] == "report" and res["schema"] >= 1 and res["lora_lens_version"]
    assert res["data"] == {"phi": [[1.0, 0.0], [0.0, 1.0]], "S": [2.0, 1.0], "bad": None, "n": 3, "t": [1, 2]}
    assert res["generated_by"].startswith("lora_lens ")
    assert [f["file"] for f in res["figures"]] == [f"figures/{n}" for n in names]
    assert res["tables"][0]["rows"] == [[0, 1.5], [1, EVIL]]
    assert res["summary"]["table"]["nan"] is None
    # atomic: nothing but the finished folder next to it, files readable by others like any new folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


def test_write_report_without_pngs_and_overwrite(tmp_path):
    out = tmp_path / "rep"
    write_report(out, _spec(), dpi=30)
    with pytest.raises(ConfigError, match="not empty"):
        write_report(out, _spec(), dpi=30)
    write_report(out, _spec(), write_pngs=False, overwrite=True, dpi=30)
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json"]
    assert "figures/" not in (out / "index.html").read_text()
    assert json.loads((out / "results.json").read_text())["data"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # the old folder and temp folders are gone


def test_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(ConfigError, match=r"json_data\['x'\]: a object"):
        write_report(tmp_path / "rep", _spec(), json_data={"x": object()}, dpi=30)
    assert list(tmp_path.iterdir()) == []


def test_same_spec_gives_identical_files(tmp_path):
    fig = _fig()
    a = write_report(tmp_path / "a", _spec(fig), dpi=30).read_bytes()
    b = write_report(tmp_path / "b", _spec(fig), dpi=30).read_bytes()
    assert a == b


def test_to_jsonable_dataclass_and_paths():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class R:
        x: np.ndarray
        p: Path

    assert to_jsonable(R(np.array([1.5, np.nan]), Path("/a/b"))) == {"x": [1.5, None], "p": "/a/b"}
