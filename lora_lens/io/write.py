"""One entry point that writes any adapter in any format lora_lens writes: :func:`write_adapter`.

The writers live beside their readers (:mod:`.peft` / :mod:`.convert`,
:mod:`.formats.kohya_write`, :mod:`.formats.mlx_write`,
:mod:`.formats.diffusers_write`), so each format's names and scale rules are
in one place. Every writer reproduces ``ΔW = s · B A`` of every module: the
factors keep their dtype (or ``dtype``), the scale goes where the format puts
it (PEFT ``lora_alpha`` / ``alpha_pattern``, kohya ``.alpha``, diffusers'
``lora_adapter_metadata``, MLX's one ``scale`` with per-module ratios folded
into ``lora_b``). LoKr / LoHa / AdaLoRA modules become plain LoRA of their
effective rank. Non-finite factors are refused, never written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..types import Adapter

#: Every ``--to`` name, in the order the CLI lists them.
WRITE_FORMATS = ("peft", "kohya", "mlx", "diffusers")


def write_adapter(adapter: Adapter, out: str | Path, *, to: str, dtype: torch.dtype | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` (any :class:`~lora_lens.types.Adapter` in factored form) as format ``to`` under ``out``.

    ``to``: ``peft`` (folder(s): ``out``, or ``out/<component>`` per diffusion component), ``kohya``
    (``out/<out's name>.safetensors``), ``mlx`` (folder ``out``) or ``diffusers``
    (``out/pytorch_lora_weights.safetensors``). ``dtype`` casts the factors (None: as stored).
    ``out`` is written atomically; an existing non-empty ``out`` needs ``overwrite``. Returns what
    was written. Refused (:class:`~lora_lens.errors.ConfigError`): a format that cannot name the
    adapter's modules (an LLM ``--to kohya``), saying what each format supports. Non-finite factors are
    refused (:class:`~lora_lens.errors.NonFiniteError`) before anything is written.

    For kohya / diffusers the modules' pipeline component comes from their names: names start with it
    (``unet.down_blocks.0…``) when ``adapter.format`` is ``kohya``, ``lycoris`` or ``diffusers`` or
    ``adapter.metadata`` has :data:`~lora_lens.io.convert.PIPELINE_KEY`; else a folder named after a
    component (``OUT/unet``) or the path's root (``down_blocks`` → unet) says it. An adapter built in
    memory from one of those keeps the source's ``format`` (``dataclasses.replace``) to stay writable.
    """
    from .convert import convert_to_peft
    from .formats import diffusers_write, kohya_write, mlx_write
    from .formats.write_common import out_factors

    if to not in WRITE_FORMATS:
        raise ConfigError(f"--to {to!r}: unknown; expected one of {list(WRITE_FORMATS)}.")
    if not adapter.modules:
        raise ConfigError(f"{adapter.path}: nothing to write; the adapter holds no LoRA modules.")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype}: expected a floating-point dtype (float32, float16, bfloat16, float64).")
    for m in adapter.modules:
        out_factors(m, None)  # NaN / Inf: refused here, whichever writer
    out = Path(out)
    if to == "peft":
        return convert_to_peft(adapter, out, overwrite=overwrite, dtype=dtype)
    writer = {"kohya": kohya_write.write, "mlx": mlx_write.write, "diffusers": diffusers_write.write}[to]
    return writer(adapter, out, dtype=dtype, overwrite=overwrite)
