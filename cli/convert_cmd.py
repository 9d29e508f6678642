"""``lora-lens convert ADAPTER --to peft|kohya|mlx|diffusers -o OUT [--save-dtype D]``: any adapter format as another."""

from __future__ import annotations

import click

from .common import echo_json
from .options import format_option, json_option, out_option, overwrite_option, save_dtype_option

#: ``--to`` names (kept here, not imported from the library, so ``--help`` stays light).
WRITE_FORMATS = ("peft", "kohya", "mlx", "diffusers")


@click.command("convert")
@click.argument("adapter", type=click.Path(path_type=str))
@click.option("--to", "target", type=click.Choice(WRITE_FORMATS), default="peft", show_default=True,
              help="Output format: a PEFT folder, a kohya .safetensors (in OUT), an MLX-LM folder or a diffusers "
                   "pytorch_lora_weights.safetensors (in OUT).")
@save_dtype_option
@out_option("Folder to write.")
@overwrite_option
@json_option
@format_option
def convert_cmd(adapter, target, save_dtype, out, overwrite, as_json, fmt) -> None:
    """Write an adapter of any format (PEFT, MLX, kohya, LyCORIS, diffusers,
    a research state dict, PEFT LoHa/LoKr/AdaLoRA) as PEFT, kohya, MLX-LM or
    diffusers, with the same ΔW = s·B·A per module (each module's scale kept
    exactly). LoKr/LoHa become LoRA pairs of their effective rank. --to peft
    gives one folder per diffusion component (OUT/unet, OUT/text_encoder, …),
    and such a folder converts back as one adapter;
    kohya and diffusers name SD1.x/SDXL UNets and text encoders and Flux/SD3
    transformers; MLX-LM names language-model layers (one rank and scale:
    smaller ranks are zero-padded, other scales folded into lora_b).

    \b
    Examples:
      lora-lens convert ./mlx-adapters -o ./peft-adapter
      lora-lens convert style_lora.safetensors --to diffusers -o ./style-diffusers
      lora-lens convert ./peft-adapter --to mlx -o ./mlx-adapters --save-dtype float16
    """
    import torch

    from lora_lens.io import load_convertible, write_adapter

    written = write_adapter(load_convertible(adapter, format=fmt), out, to=target, overwrite=overwrite,
                            dtype=getattr(torch, save_dtype) if save_dtype else None)
    if as_json:
        from lora_lens import stamp

        echo_json(stamp("converted", {"written": [str(p) for p in written], "to": target}))
    else:
        click.echo("\n".join(f"written: {p}" for p in written))
