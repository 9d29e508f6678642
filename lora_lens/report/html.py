"""A self-contained HTML report: inline CSS, figures as base64 PNG data URIs, a table of contents.

A report is built from typed pieces, so any analysis can fill it::

    Report(title="…", subtitle="…", bullets=("…", …), summary_table=(("key", value), …),
           sections=(ReportSection(heading="…", text="paragraph\\n\\nparagraph" | ("…", …),
                                   figures=(ReportFigure(Figure | png_bytes, caption="…", name="file-stem"),),
                                   tables=(ReportTable(header=("…", …), rows=((…), …), caption="…"),)),))

Each piece checks itself when built (a figure is a matplotlib ``Figure`` or PNG
bytes; table rows have equal lengths). Every piece of text is escaped
(``html.escape``): captions, cells and headings are shown as written, never
interpreted as markup. The page opens offline (no external CSS, fonts or
scripts). :func:`write_report` writes ``index.html``, ``figures/*.png`` and
``results.json`` into a folder atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from matplotlib.figure import Figure

from .. import __version__
from ..errors import ConfigError
from ..io.atomic import atomic_directory
from ..jsonable import stamp, to_jsonable
from .figures import PNG_SIGNATURE, figure_to_png_bytes


@dataclass(frozen=True, eq=False)
class ReportFigure:
    """A figure (matplotlib ``Figure`` or PNG bytes), its caption, and the stem of its file under figures/."""

    figure: Figure | bytes
    caption: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        f = self.figure
        if not (isinstance(f, Figure) or (isinstance(f, (bytes, bytearray)) and bytes(f[:8]) == PNG_SIGNATURE)):
            raise ConfigError(f"report figure {self.caption or self.name!r}: got {type(f).__name__}; expected a "
                              "matplotlib Figure or PNG bytes.")


@dataclass(frozen=True)
class ReportTable:
    """A table: ``rows`` of cells (numbers are right-aligned, floats shown with 4 significant digits)."""

    header: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    caption: str = ""

    def __post_init__(self) -> None:
        header = tuple(str(h) for h in self.header or ())
        rows = tuple(tuple(r) for r in self.rows)
        widths = {len(r) for r in rows} | ({len(header)} if header else set())
        if len(widths) > 1:
            raise ConfigError(f"report table {self.caption!r}: rows of lengths {sorted(widths)} (header included); "
                              "expected equal lengths.")
        object.__setattr__(self, "header", header)
        object.__setattr__(self, "rows", rows)


@dataclass(frozen=True, eq=False)
class ReportSection:
    """A heading, text (a string with blank-line-separated paragraphs, or several strings), figures, tables."""

    heading: str
    text: str | Sequence[str] = ()
    figures: Sequence[ReportFigure] = ()
    tables: Sequence[ReportTable] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "figures", tuple(self.figures))
        object.__setattr__(self, "tables", tuple(self.tables))

    @property
    def paragraphs(self) -> tuple[str, ...]:
        parts = [self.text] if isinstance(self.text, str) else list(self.text or ())
        return tuple(p.strip() for part in parts for p in re.split(r"\n\s*\n", str(part)) if p.strip())


@dataclass(frozen=True, eq=False)
class Report:
    """The whole page: title, subtitle, summary (bullets, tables, a key-value table), sections.

    ``bullets`` lead the summary: a few findings written as sentences;
    ``summary_tables`` hold the numbers behind them, below.
    """

    title: str
    subtitle: str = ""
    bullets: Sequence[str] = ()
    summary_table: Sequence[tuple[str, Any]] = ()
    sections: Sequence[ReportSection] = field(default_factory=tuple)
    summary_tables: Sequence[ReportTable] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bullets", tuple(str(b) for b in self.bullets))
        object.__setattr__(self, "summary_table", tuple((str(k), v) for k, v in self.summary_table))
        object.__setattr__(self, "sections", tuple(self.sections))
        object.__setattr__(self, "summary_tables", tuple(self.summary_tables))


@dataclass(frozen=True)
class _Rendered:
    """A section as written: its unique anchor, and its figures as (PNG bytes, caption, file name)."""

    section: ReportSection
    anchor: str
    figures: tuple[tuple[bytes, str, str], ...]


def slug(text: str, max_len: int = 40) -> str:
    """``"φ across layers: q_proj"`` → ``"across-layers-q-proj"`` (ASCII, safe as a file name and anchor)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].rstrip("-") or "item"


def _render(report: Report, dpi: float) -> tuple[_Rendered, ...]:
    """Anchors (distinct even for equal headings), PNG bytes, and figure files numbered through the report."""
    out, anchors, n_fig = [], {"summary", "contents"}, 0
    for sec in report.sections:
        anchor, n = slug(sec.heading), 1
        while anchor in anchors:
            n += 1
            anchor = f"{slug(sec.heading)}-{n}"
        anchors.add(anchor)
        figs = []
        for f in sec.figures:
            n_fig += 1
            png = figure_to_png_bytes(f.figure, dpi=dpi) if isinstance(f.figure, Figure) else bytes(f.figure)
            figs.append((png, f.caption, f"{n_fig:02d}-{slug(f.name or f.caption or sec.heading)}.png"))
        out.append(_Rendered(sec, anchor, tuple(figs)))
    return tuple(out)


# ---------------------------------------------------------------- rendering

CSS = """
:root { --fg: #1d232b; --muted: #5b6673; --line: #dde2e8; --accent: #2f6fad; --bg-soft: #f5f7f9; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
header, main, footer { max-width: 1180px; margin: 0 auto; padding: 0 28px; }
header { padding-top: 28px; padding-bottom: 8px; border-bottom: 3px solid var(--accent); }
h1 { margin: 0 0 4px; font-size: 1.75em; }
h2 { margin: 1.6em 0 0.5em; padding-bottom: 4px; border-bottom: 1px solid var(--line); font-size: 1.3em; }
.subtitle { margin: 0; color: var(--muted); }
a { color: var(--accent); }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 10px 18px;
          margin: 20px 0 0; }
nav.toc h2 { margin: 0 0 4px; border: 0; font-size: 1em; text-transform: uppercase; letter-spacing: .05em;
             color: var(--muted); }
nav.toc ol { margin: 0; padding-left: 1.4em; columns: 2; }
ul.bullets li { margin: 2px 0; }
.figures { display: flex; flex-wrap: wrap; gap: 18px; margin: 12px 0; }
figure { margin: 0; flex: 0 1 auto; max-width: 100%; border: 1px solid var(--line); border-radius: 6px;
         padding: 8px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; }  /* natural size: text in plots stays legible */
figcaption { margin-top: 6px; color: var(--muted); font-size: 0.92em; }
figcaption .num { font-weight: 600; color: var(--fg); }
table { border-collapse: collapse; margin: 12px 0 18px; font-size: 0.92em; }
caption { caption-side: top; text-align: left; color: var(--muted); padding-bottom: 4px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 12px; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); font-weight: 600; }
tbody tr:nth-child(even) { background: #fafbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.kv th { background: none; color: var(--muted); font-weight: normal; }
footer { color: var(--muted); font-size: 0.85em; padding-top: 24px; padding-bottom: 28px; }
@media print { nav.toc { display: none; } figure { break-inside: avoid; } }
"""


def format_cell(v: Any) -> tuple[str, bool]:
    """A table cell's text and whether it is a number (right-aligned). Floats: 4 significant digits."""
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        v = v.item()
    if v is None:
        return "—", False
    if isinstance(v, bool):
        return ("yes" if v else "no"), False
    if isinstance(v, int):
        return str(v), True
    if isinstance(v, float):
        return ("—" if math.isnan(v) else f"{v:.4g}"), True
    return str(v), False


def _cell(v: Any, tag: str = "td") -> str:
    text, num = format_cell(v)
    return f'<{tag} class="num">{html.escape(text)}</{tag}>' if num else f"<{tag}>{html.escape(text)}</{tag}>"


def _kv_html(items: Sequence[tuple[str, Any]]) -> str:
    """The summary's key-value table: keys as row headers."""
    rows = "".join(f"<tr><th>{html.escape(k)}</th>{_cell(v)}</tr>" for k, v in items)
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _table_html(t: ReportTable) -> str:
    e = html.escape
    parts = ["<table>"]
    if t.caption:
        parts.append(f"<caption>{e(t.caption)}</caption>")
    if t.header:
        parts.append("<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in t.header) + "</tr></thead>")
    parts.append("<tbody>")
    parts += ["<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in t.rows]
    parts.append("</tbody></table>")
    return "".join(parts)


def _figure_html(png: bytes, caption: str, file: str, number: int, link_png: bool) -> str:
    e = html.escape
    data = base64.b64encode(png).decode("ascii")
    link = f' <a href="figures/{e(file)}">PNG</a>' if link_png else ""
    alt = caption or f"Figure {number}"
    return (f'<figure id="fig-{number}"><img src="data:image/png;base64,{data}" alt="{e(alt)}">'
            f'<figcaption><span class="num">Figure {number}.</span> {e(caption)}{link}</figcaption></figure>')


def render_html(report: Report, link_pngs: bool = False, dpi: float = 110) -> str:
    """The whole page as one string. ``link_pngs`` adds a link to ``figures/<file>`` under each figure."""
    return _page(report, _render(report, dpi), link_pngs)


def _page(report: Report, rendered: tuple[_Rendered, ...], link_pngs: bool) -> str:
    e = html.escape
    has_summary = bool(report.bullets or report.summary_table or report.summary_tables)
    toc = ([("summary", "Summary")] if has_summary else []) + [(r.anchor, r.section.heading) for r in rendered]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f'<meta name="generator" content="lora_lens {e(__version__)}">',
           f"<title>{e(report.title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<header><h1>{e(report.title)}</h1>"]
    if report.subtitle:
        out.append(f'<p class="subtitle">{e(report.subtitle)}</p>')
    out.append("</header>")
    out.append("<main>")
    if toc:
        out.append('<nav class="toc" id="contents"><h2>Contents</h2><ol>')
        out += [f'<li><a href="#{e(a)}">{e(h)}</a></li>' for a, h in toc]
        out.append("</ol></nav>")
    if has_summary:
        out.append('<section id="summary"><h2>Summary</h2>')
        if report.bullets:
            out.append('<ul class="bullets">' + "".join(f"<li>{e(b)}</li>" for b in report.bullets) + "</ul>")
        out += [_table_html(t) for t in report.summary_tables]
        if report.summary_table:
            out.append(_kv_html(report.summary_table))
        out.append("</section>")
    number = 0
    for r in rendered:
        s = r.section
        out.append(f'<section id="{e(r.anchor)}"><h2>{e(s.heading)}</h2>')
        out += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        if r.figures:
            out.append('<div class="figures">')
            for png, caption, file in r.figures:
                number += 1
                out.append(_figure_html(png, caption, file, number, link_pngs))
            out.append("</div>")
        out += [_table_html(t) for t in s.tables]
        out.append("</section>")
    out.append("</main>")
    out.append(f"<footer>Generated by lora_lens {e(__version__)}. Self-contained: the figures are embedded; "
               "nothing is loaded from the network.</footer>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------- JSON and files

def results_json(report: Report, rendered: Sequence[_Rendered], json_data: Any = None,
                 link_pngs: bool = True) -> dict[str, Any]:
    """What ``results.json`` holds: the summary, figure files, tables, and ``json_data`` as ``data``."""
    return stamp("report", {
        "title": report.title,
        "generated_by": f"lora_lens {__version__}",
        "summary": {"bullets": list(report.bullets), "table": {k: to_jsonable(v) for k, v in report.summary_table}},
        "figures": [{"section": r.section.heading, "caption": caption,
                     "file": f"figures/{file}" if link_pngs else None}
                    for r in rendered for _, caption, file in r.figures],
        "tables": [{"section": s.heading, "caption": t.caption, "header": list(t.header),
                    "rows": to_jsonable([list(r) for r in t.rows])}
                   for s in [ReportSection("Summary", tables=report.summary_tables), *report.sections] for t in s.tables],
        "data": to_jsonable(json_data),
    })


def write_report(out_dir: str | os.PathLike, report: Report, write_pngs: bool = True,
                 json_data: Any = None, *, overwrite: bool = False, dpi: float = 110) -> Path:
    """Write ``index.html``, ``figures/*.png`` (when ``write_pngs``) and ``results.json`` into ``out_dir``.

    The folder is built beside ``out_dir`` and renamed into place at the end,
    so a reader never sees half a report. An existing non-empty ``out_dir`` is
    refused unless ``overwrite``. Returns the path of ``index.html``.
    """
    if not isinstance(report, Report):
        raise ConfigError(f"write_report: got {type(report).__name__}; expected a lora_lens.report.Report.")
    rendered = _render(report, dpi)
    # Serialize everything before touching the disk: a bad json_data leaves no folder behind.
    page = _page(report, rendered, link_pngs=write_pngs)
    data = json.dumps(results_json(report, rendered, json_data, link_pngs=write_pngs), indent=2,
                      allow_nan=False) + "\n"
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        if write_pngs:
            (tmp / "figures").mkdir()
            for r in rendered:
                for png, _, file in r.figures:
                    (tmp / "figures" / file).write_bytes(png)
        (tmp / "index.html").write_text(page, encoding="utf-8")
        (tmp / "results.json").write_text(data, encoding="utf-8")
    return Path(out_dir) / "index.html"
