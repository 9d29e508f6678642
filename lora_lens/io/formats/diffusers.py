"""diffusers LoRA files: ``pytorch_lora_weights.safetensors`` (or ``.bin``).

Three key generations, all read to today's module paths:

- PEFT-backed (diffusers ≥ 0.22): ``unet.<path>.lora_A.weight`` (r, in) /
  ``.lora_B.weight`` (out, r), also ``transformer.`` (DiT) and
  ``text_encoder.`` / ``text_encoder_2.`` prefixes;
- ``<path>.lora.down.weight`` / ``.lora.up.weight`` (LoRACompatible layers) and
  the text encoders' ``<path>.lora_linear_layer.down/up.weight``;
- the attention-processor keys ``…attn1.processor.to_q_lora.down.weight``
  (→ ``…attn1.to_q``; ``to_out_lora`` → ``to_out.0``).

Scale: a ``<path>.alpha`` tensor (network alphas, from converted kohya files)
gives ``alpha / r``; else the ``lora_adapter_metadata`` JSON that diffusers
writes beside the weights — the PEFT ``LoraConfig`` of each component, which
diffusers loads with ``LoraConfig(**metadata)``: ``alpha / r``, or
``alpha / √r`` with ``use_rslora``, ``alpha_pattern`` applied. The pipeline's
``save_lora_weights`` prefixes it by component (``unet.lora_alpha``,
``text_encoder.use_rslora``); a model's own ``save_lora_adapter`` writes it
unprefixed (``lora_alpha``), beside keys without the component prefix. No
metadata: 1, which is what diffusers itself uses (it loads an alpha-less LoRA
with ``lora_alpha = r``). Metadata that does not give a module's alpha (or is
not JSON): 1 and the flag ``scale-unknown``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ...keys import diffusers_module_path
from ...types import Adapter
from ...errors import LoraLensError
from ..jsonfile import loads_strict
from ..peft import pattern_key
from ..tensors import check_tensor, open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans, scalar

WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_ROLE = re.compile(r"^(?P<stem>.+?)\.(?:(?P<ab>lora_[AB])\.weight|lora\.(?P<du>down|up)\.weight|"
                   r"(?P<du2>down|up)\.weight|(?P<alpha>alpha))$")


def read(path: Path, file: Path) -> Adapter:
    store = open_tensor_file(file)
    groups: dict[str, dict[str, str]] = {}
    others = []
    for info in store.infos():
        m = _ROLE.match(info.name)
        if m is None or (m["du2"] and not re.search(r"(_lora|\.lora_linear_layer)$", m["stem"])):
            others.append(info)
            continue
        role = ("A" if m["ab"] == "lora_A" else "B") if m["ab"] else (
            ("A" if (m["du"] or m["du2"]) == "down" else "B") if (m["du"] or m["du2"]) else "alpha")
        groups.setdefault(diffusers_module_path(m["stem"]), {})[role] = info.name
    orphans = [f"'{n}' has {'A' if 'A' in g else 'B'} but not {'B' if 'A' in g else 'A'}"
               for n, g in groups.items() if len({"A", "B"} & set(g)) == 1]
    refuse_orphans(file, orphans, "a down (A) and an up (B) factor")
    meta = _adapter_metadata(getattr(store, "metadata", {}) or {})
    modules, unknown = [], []
    for name, g in groups.items():
        if not {"A", "B"} <= set(g):
            continue
        A = store.get(g["A"], validate=False)
        r = int(A.shape[0])
        if "alpha" in g:
            alpha = scalar(check_tensor(store.get(g["alpha"], validate=False), g["alpha"], file), g["alpha"], file)
            scaling = alpha / r
        elif meta is None:  # metadata that is not JSON: the scale is lost
            alpha, scaling = float(r), 1.0
            unknown.append(name)
        else:
            alpha, scaling, known = _metadata_scale(meta, name, r)
            if not known:
                unknown.append(name)
        modules.append(lora_module(name, A, store.get(g["B"], validate=False), scaling=scaling, alpha=alpha,
                                   file=file, keys=(g["A"], g["B"]), stored_as=g["A"].rsplit(".", 2)[0]))
    refuse_empty(file, modules, "'<path>.lora_A.weight', '<path>.lora.down.weight' or '…_lora.down.weight' keys")
    return make_adapter(path, modules, format="diffusers", weights_file=file, others=others, scale_unknown=unknown)


def _adapter_metadata(md: dict) -> dict | None:
    """The parsed ``lora_adapter_metadata`` (``{}`` when absent), or None when it is not a JSON object."""
    try:
        meta = loads_strict(md.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata", "a JSON object")
    except (ValueError, LoraLensError):
        return None
    return meta if isinstance(meta, dict) else None


def _metadata_scale(meta: dict, name: str, r: int) -> tuple[float, float, bool]:
    """``(alpha, s, known)`` for module ``name`` of rank ``r`` from diffusers' ``lora_adapter_metadata``.

    The component's PEFT ``LoraConfig``: prefixed ``{component}.lora_alpha`` (pipeline
    ``save_lora_weights``) or unprefixed ``lora_alpha`` (a model's ``save_lora_adapter``),
    with its ``alpha_pattern`` (matched against the path inside the component, PEFT's
    rule) and ``use_rslora``: ``s = alpha / r`` or ``alpha / √r``. No metadata at all:
    ``alpha = r``, s = 1 (diffusers' own convention), known. Metadata that gives no
    ``lora_alpha`` for this module's component: s = 1, not known.
    """
    if not meta:
        return float(r), 1.0, True
    component, _, rest = name.partition(".")
    if f"{component}.lora_alpha" in meta:
        prefix, path = f"{component}.", rest
    elif "lora_alpha" in meta:
        prefix, path = "", name
    else:
        return float(r), 1.0, False
    try:
        patterns = meta.get(f"{prefix}alpha_pattern") or {}
        key = pattern_key(list(patterns), path) if isinstance(patterns, dict) else None
        alpha = float(patterns[key] if key is not None else meta[f"{prefix}lora_alpha"])
    except (TypeError, ValueError):
        return float(r), 1.0, False
    rslora = meta.get(f"{prefix}use_rslora") is True
    return alpha, (alpha / math.sqrt(r) if rslora else alpha / r), True
