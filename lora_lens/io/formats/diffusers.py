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
writes beside the weights (``unet.lora_alpha``, ``unet.r``, patterns); else
1, which is what diffusers itself uses (it loads an alpha-less LoRA with
``lora_alpha = r``).
"""

from __future__ import annotations

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
    modules = []
    for name, g in groups.items():
        if not {"A", "B"} <= set(g):
            continue
        A = store.get(g["A"], validate=False)
        r = int(A.shape[0])
        if "alpha" in g:
            alpha = scalar(check_tensor(store.get(g["alpha"], validate=False), g["alpha"], file), g["alpha"], file)
        else:
            alpha = _metadata_alpha(meta, name, r)
        modules.append(lora_module(name, A, store.get(g["B"], validate=False), scaling=alpha / r, alpha=alpha,
                                   file=file, keys=(g["A"], g["B"]), stored_as=g["A"].rsplit(".", 2)[0]))
    refuse_empty(file, modules, "'<path>.lora_A.weight', '<path>.lora.down.weight' or '…_lora.down.weight' keys")
    return make_adapter(path, modules, format="diffusers", weights_file=file, others=others)


def _adapter_metadata(md: dict) -> dict:
    try:
        return loads_strict(md.get("lora_adapter_metadata", "{}"), "lora_adapter_metadata", "a JSON object") or {}
    except (ValueError, LoraLensError):
        return {}


def _metadata_alpha(meta: dict, name: str, r: int) -> float:
    """``lora_alpha`` for ``name`` from diffusers' ``{component}.lora_alpha`` / ``alpha_pattern``; else r (s = 1)."""
    component, _, rest = name.partition(".")
    alpha = meta.get(f"{component}.lora_alpha")
    if alpha is None:
        return float(r)
    patterns = meta.get(f"{component}.alpha_pattern") or {}
    key = pattern_key(list(patterns), rest)
    return float(patterns[key] if key is not None else alpha)
