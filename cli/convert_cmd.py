"""``lora-lens convert ADAPTER --to peft -o OUT``: any adapter format as PEFT LoRA folder(s)."""

from __future__ import annotations

import click

from .common import echo_json
from .options import format_option, json_option, out_option, overwrite_option


@click.command("convert")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="Output format.")
@out_option("Folder to write.")
@overwrite_option
@json_option
@format_option
def convert_cmd(adapter, target, out, overwrite, as_json, fmt) -> None:
    """Write an adapter of any format (MLX, kohya, LyCORIS, diffusers, a
    research state dict, PEFT LoHa/LoKr/AdaLoRA) as a PEFT LoRA folder that
    peft.PeftModel.from_pretrained loads, with the same ΔW. LoKr/LoHa become
    LoRA pairs of their effective rank. A diffusion adapter gives one folder
    per component (OUT/unet, OUT/text_encoder, …).

    \b
    Examples:
      lora-lens convert ./mlx-adapters -o ./peft-adapter
      lora-lens convert style_lora.safetensors --to peft -o ./style-peft
    """
    from lora_lens.io import convert_to_peft, load_adapter

    written = convert_to_peft(load_adapter(adapter, format=fmt), out, overwrite=overwrite)
    if as_json:
        from lora_lens import stamp

        echo_json(stamp("converted", {"written": [str(p) for p in written], "to": target}))
    else:
        click.echo("\n".join(f"written: {p}" for p in written))
