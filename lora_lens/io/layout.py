"""How each base module stores its weight (``linear`` ``(m, n)`` or ``conv1d`` ``(n, m)``), decided per module.

PEFT decides ``fan_in_fan_out`` per module, not per adapter
(``peft.tuners.lora.layer.dispatch_default``): a ``torch.nn.Linear`` target is
forced to ``fan_in_fan_out=False`` and a ``transformers`` ``Conv1D`` target to
``True``, whatever the config says, and the config it saves holds whatever
the *last* wrapped module left there. A GPT-2 adapter that also targets the
(Linear) ``lm_head`` is saved with ``fan_in_fan_out=false`` although its
blocks are Conv1D. The config's flag is therefore only a hint; with a base the
layout of every module is decided here, for a module whose ``ΔW`` is
``(m, n)`` and whose base weight is stored as ``S``:

1. ``m ≠ n``: the shape decides: ``S = (m, n)`` → ``linear``, ``S = (n, m)`` → ``conv1d``.
2. ``m = n``: the base's module type. ``transformers`` builds ``Conv1D`` only in
   the GPT-2 family (``config.json`` ``model_type`` in :data:`CONV1D_MODEL_TYPES`)
   and there exactly for the modules named in :data:`CONV1D_MODULES`; every other
   module (a head, a classifier, a multiple-choice summary) is a Linear.
3. ``m = n`` and no ``config.json``: the family is guessed from the weight
   names, and the adapter is flagged: the layout is ambiguous.

Embedding and Conv2d modules keep the layout their keys give them. A Conv whose kernel the file
stores flattened (a LyCORIS / PEFT LoHa, a LoKr's factored ``w2``: 2-D ``(r, in·kh·kw)``; read as
``linear``, or ``conv`` with kernel ``()`` when the name says conv) gets ``conv`` and the kernel of its
base weight ``(out, in, kh, kw)`` when ``out = m`` and ``in·kh·kw = n``.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..errors import LoraLensError
from ..keys import architecture_family
from ..types import Adapter, LoraModule
from .base import BaseWeights
from .formats.lycoris import KERNEL_UNKNOWN, kernel_unknown_flags
from .jsonfile import read_json

#: ``config.json`` model types whose blocks use ``transformers.Conv1D`` (weight stored ``(n, m)``).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp")
#: The module names ``transformers`` builds as ``Conv1D`` in those models (``modeling_gpt2.py`` and kin).
CONV1D_MODULES = ("c_attn", "q_attn", "c_proj", "c_fc")
#: Layouts this module decides between; the others come from the PEFT keys.
_DECIDED = ("linear", "conv1d")


def model_type_is_conv1d(base: BaseWeights) -> bool | None:
    """True/False from ``config.json``'s ``model_type`` beside the weights; None without one."""
    folder = base.path if base.path.is_dir() else base.path.parent
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        config = read_json(cfg, "a Hugging Face config.json")
    except LoraLensError:  # an unreadable config only means the layout is decided from shapes and names
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return None if not model_type else model_type in CONV1D_MODEL_TYPES


def is_conv1d_base(base: BaseWeights) -> bool:
    """True when the base is a GPT-2-family model (from ``config.json``; else guessed from the weight names)."""
    known = model_type_is_conv1d(base)
    return known if known is not None else architecture_family(base.names()) == "gpt2"


def named_conv1d(weight: str) -> bool:
    """True for a weight ``transformers`` builds as ``Conv1D`` in a GPT-2-family model (by its module name)."""
    return weight.removesuffix(".weight").rsplit(".", 1)[-1] in CONV1D_MODULES


def weight_layout(base: BaseWeights, weight: str) -> str:
    """``conv1d`` or ``linear`` for one 2-D base weight, by the module-type rule of the module docstring."""
    return "conv1d" if is_conv1d_base(base) and named_conv1d(weight) else "linear"


def with_base_layouts(adapter: Adapter, base: BaseWeights) -> Adapter:
    """``adapter`` with each Linear/Conv1D module's layout decided from ``base`` (module docstring).

    A module whose base weight fits neither orientation keeps its layout (the
    pairing then reports the mismatch). Square modules decided without a
    ``config.json`` add a flag naming them.
    """
    decided = [m for m in adapter if m.layout in _DECIDED or (m.layout == "conv" and not m.kernel)]
    if not decided:
        return adapter
    weights = base.weight_names_for([m.name for m in decided])
    known = model_type_is_conv1d(base)
    family = known if known is not None else architecture_family(base.names()) == "gpt2"
    layouts: dict[str, str] = {}
    kernels: dict[str, tuple[int, ...]] = {}
    guessed: list[str] = []
    for m in decided:
        stored = tuple(base.info(weights[m.name]).shape)
        rows, cols = m.shape
        if len(stored) > 2:  # a Conv kernel (out, in, kh, kw) the file stored flattened
            if stored[0] == rows and math.prod(stored[1:]) == cols:
                layouts[m.name], kernels[m.name] = "conv", stored[2:]
            continue  # else the pairing reports the mismatch
        if m.layout == "conv":
            continue
        if rows != cols:
            layouts[m.name] = {(rows, cols): "linear", (cols, rows): "conv1d"}.get(stored, m.layout)
            continue
        layouts[m.name] = "conv1d" if family and named_conv1d(weights[m.name]) else "linear"
        if known is None and (family or m.layout == "conv1d"):
            guessed.append(f"{m.name} → {layouts[m.name]}")
    modules = tuple(_relayout(m, layouts.get(m.name, m.layout), kernels.get(m.name, m.kernel)) for m in adapter)
    flags = tuple(f for f in adapter.flags if not f.startswith(KERNEL_UNKNOWN)) + tuple(kernel_unknown_flags(modules))
    if guessed:
        flags += (
            f"layout ambiguous for {len(guessed)} square module(s) ({', '.join(guessed[:3])}"
            f"{' …' if len(guessed) > 3 else ''}): base {base.path} has no config.json naming its model type, "
            "so Linear vs Conv1D was guessed from the weight names. Put the model's config.json beside the weights.",
        )
    return replace(adapter, modules=modules, flags=flags)


def _relayout(m: LoraModule, layout: str, kernel: tuple[int, ...]) -> LoraModule:
    return m if (m.layout, m.kernel) == (layout, kernel) else replace(m, layout=layout, kernel=kernel)
