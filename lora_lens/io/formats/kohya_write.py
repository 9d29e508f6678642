"""Write kohya / sd-scripts LoRA files (the names :mod:`.kohya` reads).

One ``.safetensors`` file, ``OUT/<OUT's name>.safetensors``, with per module
``<stem>.lora_down.weight`` A ``(r, in)`` (Conv2d: ``(r, in, kh, kw)``),
``<stem>.lora_up.weight`` B ``(out, r)`` (Conv2d: ``(out, r, 1, 1)``) and
``<stem>.alpha``: sd-scripts applies ``(alpha / r) · up · down``, so
``alpha = s · r`` per module reproduces each module's scale ``s`` (``s = 0``: ``B = 0``, ``alpha = r``, since
sd-scripts reads ``alpha = 0`` as ``alpha = r``) (float32,
6e-8 relative; float64 with ``dtype=float64``). Stems
(:func:`lora_lens.keys.kohya_name`): ``lora_unet_<diffusers path>`` (what
sd-scripts writes for SD1.x and what diffusers and ComfyUI read for SDXL),
``lora_te_`` (SD1.x/2.x) or ``lora_te1_`` / ``lora_te2_`` (SDXL; ``lora_te1_``
beside a DiT or a UNet named as sd-scripts names SDXL / Flux / SD3), ``lora_te3_`` and ``lora_transformer_<diffusers path>`` for
Flux / SD3 transformers, the naming diffusers' Flux loader reads. LoKr / LoHa
modules are written as plain LoRA of their effective rank.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...keys import kohya_name
from ...types import Adapter
from ..atomic import atomic_directory, atomic_save_safetensors
from .write_common import by_component, check_names, conv_factors, modal, out_factors, provenance, refuse_embeddings


def write(adapter: Adapter, out: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` as ``out/<out.name>.safetensors``; returns ``[that file]``."""
    groups = by_component(adapter, "kohya")
    te = "lora_te1_" if _first_of_several(groups) else "lora_te_"
    tensors: dict[str, torch.Tensor] = {}
    stems, ranks, alphas = [], [], []
    for component, modules in groups.items():
        refuse_embeddings(modules, "kohya")
        for m in modules:
            stem = kohya_name(component, m.name, text_encoder_prefix=te)
            A, B = out_factors(m, dtype)
            if m.layout == "conv":
                A, B = conv_factors(m, A, B)
            alpha = m.scaling * m.rank
            if alpha == 0:  # sd-scripts (and our reader) read alpha 0 as alpha = r: write the zero update as B = 0
                B, alpha = torch.zeros_like(B), float(m.rank)
            alpha_dtype = torch.float64 if (dtype or m.A.dtype) == torch.float64 else torch.float32
            tensors[f"{stem}.lora_down.weight"] = A
            tensors[f"{stem}.lora_up.weight"] = B
            tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=alpha_dtype)
            stems.append(stem)
            ranks.append(m.rank)
            alphas.append(alpha)
    check_names(out, stems, "kohya")
    meta = {**provenance(adapter), "ss_network_module": "networks.lora", "ss_network_dim": str(modal(ranks)),
            "ss_network_alpha": repr(float(modal(alphas)))}
    file = out / f"{out.name}.safetensors"
    with atomic_directory(out, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, tmp / file.name, meta)
    return [file]


#: Roots of the UNet / DiT paths sd-scripts writes for SDXL (SGM names), Flux (BFL) and SD3 (SAI MMDiT):
#: models whose first text encoder is ``lora_te1_`` even when it is the only one in the file.
_SEVERAL_ENCODER_ROOTS = ("input_blocks", "middle_block", "output_blocks", "double_blocks", "single_blocks",
                          "joint_blocks")


def _first_of_several(groups: dict) -> bool:
    """Whether ``text_encoder`` is the first of several (``lora_te1_``): beside a second one, beside a DiT, or
    beside a UNet named as sd-scripts names SDXL's, Flux's or SD3's."""
    if {"text_encoder_2", "text_encoder_3", "transformer"} & set(groups):
        return True
    return any(m.name.split(".", 1)[0] in _SEVERAL_ENCODER_ROOTS for m in groups.get("unet", ()))
