"""``lora-lens inspect PATH``: what an adapter or a base checkpoint holds."""

from __future__ import annotations

import click

from .common import echo_json, human_bytes, table
from .options import format_option, json_option


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@json_option
@format_option
def inspect_cmd(path: str, as_json: bool, fmt: str | None) -> None:
    """Show what an adapter (PEFT, MLX, kohya, LyCORIS, diffusers or a research
    state dict: the format found is printed) or a base checkpoint holds.

    For an adapter: every LoRA module with its block, type, shape (m, n), rank,
    alpha, scaling, dtype and base layout; tensors that are not LoRA pairs;
    totals. For a base: 2-D weights grouped by module type. No tensor data of a
    base is read.

    \b
    Examples:
      lora-lens inspect ./my-adapter
      lora-lens inspect stories260K --json
    """
    from lora_lens import inspect_path

    info = inspect_path(path, fmt)
    if as_json:
        echo_json(info)
        return
    for item in info["adapters"] if info["kind"] == "adapters" else [info]:
        click.echo(render_adapter(item) if item["kind"] == "adapter" else render_base(item))


def render_adapter(d: dict) -> str:
    name = f" [{d['adapter_name']}]" if d["adapter_name"] else ""
    t = d["totals"]
    head = [
        f"{d['format']} adapter{name}: {d['path']}",
        f"  family {d['family']}, r={d['r']}, alpha={d['lora_alpha']:g}"
        + (", rsLoRA" if d["use_rslora"] else "") + (", fan_in_fan_out" if d["fan_in_fan_out"] else ""),
        f"  {t['modules']} LoRA modules of {len(t['module_types'])} type(s), "
        f"{t['parameters']:,} parameters ({human_bytes(t['bytes'])})",
    ]
    for f in d["flags"]:
        head.append(f"  note: {f}")
    meta = d.get("metadata") or {}
    head += [f"  {k}: {str(v)[:100]}" for k, v in meta.items()]
    rows = [[m["name"], m["block_name"] or m["block"], m["module_type"], f"{m['shape'][0]}x{m['shape'][1]}", m["kind"],
             m["rank"], m["alpha"], m["scaling"], m["dtype"], m["layout"]] for m in d["modules"]]
    body = table(rows, ["name", "block", "type", "m x n", "kind", "rank", "alpha", "scaling", "dtype", "layout"])
    out = "\n".join(head) + "\n\n" + body
    if d["other_tensors"]:
        rows = [[o["name"], "x".join(map(str, o["shape"])), o["dtype"]] for o in d["other_tensors"]]
        out += "\n\nOther tensors (not LoRA pairs):\n" + table(rows, ["name", "shape", "dtype"])
    return out + "\n"


def render_base(d: dict) -> str:
    t = d["totals"]
    head = (f"Base checkpoint ({d['format']}, family {d['family']}): {d['path']}\n"
            f"  {t['tensors']} tensors, {t['parameters']:,} parameters ({human_bytes(t['bytes'])})\n")
    rows = [[g["module_type"], g["count"], ", ".join("x".join(map(str, s)) for s in g["shapes"]), ",".join(g["dtypes"])]
            for g in d["groups"]]
    return head + "\n2-D weights by module type:\n" + table(rows, ["module type", "count", "shapes", "dtype"]) + "\n"
