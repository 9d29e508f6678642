"""How the init commands (condlora, cora, pissa) print what they wrote."""

from __future__ import annotations

import click

from .common import echo_json, table


def render_init(result, as_json: bool, columns: list[str]) -> None:
    """Print what an init wrote: one JSON object, or a header and a table of its records."""
    if as_json:
        echo_json(result.to_dict())
        return
    d = result.to_dict()
    init = d.get("init")
    if init:
        mode = f", mode {init['mode']}" if init["mode"] else ""
        frozen = f", frozen {', '.join(init['frozen'])}" if init["frozen"] else ""
        click.echo(f"{init['method']} init written to {d['out_dir']}: rank {init['rank']}, alpha {init['alpha']:g}"
                   f"{mode}{frozen}; targets {', '.join(init['targets'])}")
    else:
        click.echo(f"written to {d['out_dir']}")
    click.echo("  " + ", ".join(f"{k} {_summary_value(v)}" for k, v in d["summary"].items() if v is not None))
    rows = [[_cell(rec.get(c)) for c in columns] for rec in d["records"]]
    click.echo(table(rows, columns))


def _summary_value(v):
    """Floats to 4 significant digits, as the table prints them (not 0.857332164434126)."""
    return f"{v:.4g}" if isinstance(v, float) else _cell(v)


def _cell(v):
    if isinstance(v, dict):
        return ", ".join(f"{k}={v2:.3g}" if isinstance(v2, float) else f"{k}={v2}" for k, v2 in v.items())
    if isinstance(v, list):
        return "x".join(map(str, v))
    return v
