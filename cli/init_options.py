"""Options and rendering shared by the init commands (condlora, cora, pissa, reduce)."""

from __future__ import annotations

import click

from .common import echo_json, table

overwrite_option = click.option("--overwrite", is_flag=True, help="Replace OUT if it exists and is not empty.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Seed for every random draw.")


def out_option(what: str):
    return click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=str), help=what)


def targets_option(required: bool = True):
    return click.option(
        "--targets", "targets", multiple=True, required=required,
        help="Module names, comma-separated or repeated: q_proj,v_proj selects every module type ending with "
             "them (self_attn.q_proj, …).",
    )


def join_targets(targets: tuple[str, ...]) -> list[str] | None:
    names = [t.strip() for group in targets for t in group.split(",") if t.strip()]
    return names or None


def render_init(result, as_json: bool, columns: list[str]) -> None:
    """Print what an init wrote: one JSON object, or a header and a table of its records."""
    if as_json:
        echo_json(result.to_dict())
        return
    d = result.to_dict()
    init = d.get("init")
    if init:
        mode = f", mode {init['mode']}" if init["mode"] else ""
        frozen = f", frozen {init['frozen']}" if init["frozen"] else ""
        click.echo(f"{init['method']} init written to {d['out_dir']}: rank {init['rank']}, alpha {init['alpha']:g}"
                   f"{mode}{frozen}; targets {', '.join(init['targets'])}")
    else:
        click.echo(f"written to {d['out_dir']}")
    click.echo("  " + ", ".join(f"{k} {v}" for k, v in d["summary"].items() if v is not None))
    rows = [[_cell(rec.get(c)) for c in columns] for rec in d["records"]]
    click.echo(table(rows, columns))


def _cell(v):
    if isinstance(v, dict):
        return ", ".join(f"{k}={v2:.3g}" if isinstance(v2, float) else f"{k}={v2}" for k, v2 in v.items())
    if isinstance(v, list):
        return "x".join(map(str, v))
    return v
