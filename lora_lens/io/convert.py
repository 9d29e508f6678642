"""Any adapter read by :mod:`.formats` written as PEFT LoRA folder(s) (``lora-lens convert``).

The factored form is exact, so ``ΔW = s·B·A`` of the result equals the
source's: ``lora_alpha`` is derived from each module's scale
(:func:`~lora_lens.io.peft.save_peft_adapter`) and the factors are written in
their stored dtype. LoKr / LoHa / AdaLoRA modules become plain LoRA pairs of
their effective rank (r₁·r₂ for LoKr / LoHa).

Module names must be the model's module paths. Diffusion adapters name
several models at once (``unet.``, ``text_encoder.``, ``text_encoder_2.``,
``transformer.``): each becomes its own PEFT folder ``OUT/<component>`` with
the prefix dropped, to load on that component.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..keys import parse_module_path
from ..types import Adapter
from .peft import save_peft_adapter

#: Diffusion pipeline components whose modules a single adapter file may mix.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def components(adapter: Adapter) -> dict[str, list]:
    """Modules grouped by pipeline component (``{"": modules}`` for a single-model adapter)."""
    groups: dict[str, list] = {}
    for m in adapter.modules:
        head, _, rest = m.name.partition(".")
        if head in COMPONENTS and rest and adapter.format in ("kohya", "lycoris", "diffusers"):
            groups.setdefault(head, []).append(replace(m, name=rest, key=parse_module_path(rest)))
        else:
            groups.setdefault("", []).append(m)
    return groups


def convert_to_peft(adapter: Adapter, out: str | Path, *, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``adapter`` as PEFT LoRA folder(s) under ``out`` (factors cast to ``dtype`` if given);
    returns the folders written. :func:`lora_lens.io.write_adapter` writes every other format."""
    out = Path(out)
    groups = components(adapter)
    if "" in groups and len(groups) > 1:
        raise ConfigError(f"{adapter.path}: mixes pipeline components {sorted(g for g in groups if g)} with other "
                          "modules; cannot tell which model those belong to.")
    meta = {"converted_from": adapter.format, "source": str(adapter.weights_file or adapter.path),
            "kinds": ",".join(sorted({m.kind for m in adapter.modules}))}
    written = []
    for component, modules in groups.items():
        folder = out / component if component else out
        written.append(save_peft_adapter(folder, modules, metadata=meta, overwrite=overwrite, dtype=dtype))
    return written
