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


#: ``Adapter.metadata`` key of an adapter read from per-component PEFT folders (:func:`load_convertible`):
#: its module names start with their component, as a kohya or diffusers file's do.
PIPELINE_KEY = "pipeline_components"


def names_components(adapter: Adapter) -> bool:
    """Whether ``adapter``'s module names start with their pipeline component (``unet.…``)."""
    return adapter.format in ("kohya", "lycoris", "diffusers") or bool(adapter.metadata.get(PIPELINE_KEY))


def components(adapter: Adapter) -> dict[str, list]:
    """Modules grouped by pipeline component (``{"": modules}`` for a single-model adapter)."""
    groups: dict[str, list] = {}
    prefixed = names_components(adapter)
    for m in adapter.modules:
        head, _, rest = m.name.partition(".")
        if head in COMPONENTS and rest and prefixed:
            groups.setdefault(head, []).append(replace(m, name=rest, key=parse_module_path(rest)))
        else:
            groups.setdefault("", []).append(m)
    return groups


def convert_to_peft(adapter: Adapter, out: str | Path, *, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> list[Path]:
    """Write ``adapter`` as PEFT LoRA folder(s) under ``out`` (factors cast to ``dtype`` if given);
    returns the folders written. :func:`lora_lens.io.write_adapter` writes every other format."""
    out = Path(out)
    if adapter.format == "lora_diffusion":  # its modules are injection indices, not module paths PEFT could target
        raise ConfigError(f"{adapter.path}: a lora_diffusion file names its modules by injection index "
                          f"({adapter.modules[0].name}, …), not by module path, so PEFT could not load it; "
                          "see docs/formats.md (cloneofsimo/lora).")
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


def load_convertible(path: str | Path, format: str | None = None) -> Adapter:
    """The adapter at ``path`` as ``convert`` reads it: any format :func:`~lora_lens.io.load_adapter` reads, or
    a folder of per-component PEFT folders (``OUT/unet``, ``OUT/text_encoder``, … as :func:`convert_to_peft`
    writes a diffusion adapter) read as the one adapter it came from, module names prefixed by component.

    So ``kohya → peft → kohya`` gives back one file with every component (and SDXL's ``lora_te1_`` /
    ``lora_te2_``), not one file per folder.
    """
    from .formats import load_adapter
    from .formats.factors import settings_of
    from .peft import load_adapter as load_peft

    folder = Path(path)
    if format in (None, "peft") and folder.is_dir() and not (folder / "adapter_config.json").exists():
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "adapter_config.json").is_file())
        if subs and all(p.name in COMPONENTS for p in subs):
            parts = [(p.name, load_peft(p)) for p in subs]
            modules = sorted((replace(m, name=f"{c}.{m.name}", key=parse_module_path(f"{c}.{m.name}"))
                              for c, a in parts for m in a.modules), key=lambda m: m.key.sort_key())
            return Adapter(path=folder, settings=settings_of(modules), modules=tuple(modules),
                           other_tensors=tuple(o for _, a in parts for o in a.other_tensors),
                           flags=tuple(dict.fromkeys(f for _, a in parts for f in a.flags)),
                           delta_is_sBA=all(a.delta_is_sBA for _, a in parts), format="peft",
                           weights_file=None, metadata={PIPELINE_KEY: [c for c, _ in parts]})
    return load_adapter(path, format=format)
