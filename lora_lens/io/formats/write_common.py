"""What every adapter writer shares: plain LoRA factors in the output dtype, modules per pipeline component.

Every :class:`~lora_lens.types.LoraModule` is held as ``ΔW = s · B A`` with
``A (r, n)`` and ``B (m, r)`` (LoKr / LoHa already multiplied out to rank
r₁·r₂ by their readers), so every writer writes a plain LoRA pair; only the
names, the layout of the factors and where the scale goes differ by format.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from ... import __version__
from ...errors import ConfigError, NonFiniteError
from ...keys import DIFFUSION_COMPONENTS, diffusion_component, parse_module_path
from ...types import Adapter, LoraModule
from ..convert import names_components

#: What each output format can name, said by every refusal of a ``--to``.
SUPPORTED = ("Supported: --to peft any adapter; --to mlx language-model Linear/Embedding layers; --to kohya and "
             "--to diffusers SD1.x/SDXL UNets and text encoders and Flux/SD3 transformers.")


def out_factors(m: LoraModule, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A (r, n), B (m, r))`` in ``dtype`` (None: as stored), refused when not finite (never written)."""
    A, B = (m.A, m.B) if dtype is None else (m.A.to(dtype), m.B.to(dtype))
    for name, t, stored in (("A", A, m.A), ("B", B, m.B)):
        if not bool(torch.isfinite(t).all()):
            why = "holds NaN or Inf" if not bool(torch.isfinite(stored).all()) else f"overflows {dtype}"
            raise NonFiniteError(f"'{m.name}': factor {name} {why}; nothing was written. Check the input "
                                 "(lora-lens inspect) or write a wider dtype (--save-dtype).")
    return A.contiguous(), B.contiguous()


def conv_factors(m: LoraModule, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Conv2d pair as stored by kohya, PEFT and diffusers: ``A (r, in, kh, kw)``, ``B (out, r, 1, 1)``."""
    if not m.kernel:
        raise ConfigError(f"'{m.name}': a Conv2d factor whose kernel size is unknown (stored flattened); the "
                          "output needs the down factor as (r, in, kh, kw).")
    return A.reshape(A.shape[0], -1, *m.kernel), B.reshape(*B.shape, 1, 1)


def modal(values: Sequence):
    """The most common value (the first seen among ties), the default that patterns override."""
    return Counter(values).most_common(1)[0][0]


#: How a CLIP text encoder's module paths start when transformers names them without ``text_model.``
#: (a T5 encoder's ``encoder.block.…`` is not CLIP's and keeps its path).
_CLIP_ROOTS = ("encoder.layers.", "embeddings.", "final_layer_norm")


def component_paths(adapter: Adapter) -> list[tuple[str | None, str]]:
    """``(pipeline component or None, path inside it)`` of every module, in order.

    Names start with their component where the reader put it there (kohya, LyCORIS, diffusers, a folder
    of component folders); a PEFT folder named after a component (``OUT/unet``) gives its modules that
    component; otherwise the path's root tells (``down_blocks`` → unet). Text-encoder paths keep CLIP's
    ``text_model.`` root, which kohya and diffusers files name (transformers ≥ 5 drops it).
    """
    prefixed = names_components(adapter)
    hint = adapter.path.name if adapter.path.name in DIFFUSION_COMPONENTS else None
    out = []
    for m in adapter.modules:
        component, path = diffusion_component(m.name, prefixed=prefixed, hint=hint)
        if component is not None and component.startswith("text_encoder") and path.startswith(_CLIP_ROOTS):
            path = "text_model." + path
        out.append((component, path))
    return out


def by_component(adapter: Adapter, to: str) -> dict[str, list[LoraModule]]:
    """Modules per diffusion pipeline component, named by their path inside it (``down_blocks.0.…``).

    A module of no component (an LLM's ``model.layers.0…``) is refused: kohya and diffusers name
    diffusion models only.
    """
    groups: dict[str, list[LoraModule]] = {}
    stray = []
    for m, (component, path) in zip(adapter.modules, component_paths(adapter)):
        if component is None:
            stray.append(m.name)
        else:
            groups.setdefault(component, []).append(
                m if path == m.name else replace(m, name=path, key=parse_module_path(path)))
    if stray:
        raise ConfigError(
            f"{adapter.path}: module '{stray[0]}'{f' and {len(stray) - 1} more' if len(stray) > 1 else ''} belong to no "
            f"diffusion pipeline component (unet., text_encoder., text_encoder_2., transformer.), so --to {to} has no "
            f"name for them. {SUPPORTED}")
    return groups


def refuse_embeddings(modules: Sequence[LoraModule], to: str) -> None:
    emb = [m.name for m in modules if m.layout == "embedding"]
    if emb:
        raise ConfigError(f"'{emb[0]}': an Embedding update; --to {to} writes Linear and Conv2d updates only. "
                          f"{SUPPORTED}")


def provenance(adapter: Adapter) -> dict[str, str]:
    """Text metadata every writer adds: where the weights came from."""
    return {"lora_lens_version": __version__, "converted_from": adapter.format,
            "source": str(adapter.weights_file or adapter.path)}


def check_names(out: Path, names: Sequence[str], to: str) -> None:
    """Two modules that the format would write under one name: refused, both named."""
    seen: dict[str, int] = Counter(names)
    dup = [n for n, c in seen.items() if c > 1]
    if dup:
        raise ConfigError(f"{out}: two modules map to the {to} name '{dup[0]}'; the output cannot hold both. "
                          "Write it --to peft.")
