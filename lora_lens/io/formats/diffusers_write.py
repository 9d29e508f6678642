"""Write diffusers LoRA files: ``OUT/pytorch_lora_weights.safetensors`` (the names :mod:`.diffusers` reads).

What ``save_lora_weights`` writes (diffusers ``loaders/lora_base.py``): the
PEFT state dict of each component under its prefix,
``<component>.<path>.lora_A.weight`` A ``(r, in)`` (Conv2d ``(r, in, kh, kw)``)
and ``.lora_B.weight`` B ``(out, r)`` (Conv2d ``(out, r, 1, 1)``), and the
safetensors metadata ``lora_adapter_metadata``: one JSON object holding each
component's ``LoraConfig`` fields under ``<component>.<field>``
(``_pack_dict_with_prefix``), from which diffusers builds the ``LoraConfig``
it loads with. ``lora_alpha = s · r`` per module (the modal one as
``lora_alpha``, the others in ``alpha_pattern``; ranks likewise in
``rank_pattern``) so PEFT's ``alpha / r`` is each module's scale. Module paths
are written as regexes that match exactly that module: pattern keys
``^<escaped path>`` (PEFT matches them with ``re.match(rf"(.*\\.)?({key})$")``, so
the anchor keeps a root module, a DiT's ``proj_out``, from also matching
``single_transformer_blocks.0.proj_out``) and ``target_modules`` one regex
string, ``a|b|…`` (PEFT ``re.fullmatch``es it), so PEFT wraps these modules
and no others. A text encoder's ``text_model.`` is optional in them: diffusers
drops it from the keys for transformers' flattened ``CLIPTextModel``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ...types import Adapter
from ..atomic import atomic_directory, atomic_save_safetensors
from .diffusers import WEIGHT_NAMES
from .write_common import by_component, check_names, conv_factors, modal, out_factors, provenance, refuse_embeddings

#: The safetensors metadata key diffusers reads the per-component ``LoraConfig`` from.
METADATA_KEY = "lora_adapter_metadata"


def write(adapter: Adapter, out: Path, *, dtype: torch.dtype | None = None, overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` as ``out/pytorch_lora_weights.safetensors``; returns ``[that file]``."""
    groups = by_component(adapter, "diffusers")
    tensors: dict[str, torch.Tensor] = {}
    config: dict = {}
    names = []
    for component, modules in groups.items():
        refuse_embeddings(modules, "diffusers")
        for m in modules:
            A, B = out_factors(m, dtype)
            if m.layout == "conv":
                A, B = conv_factors(m, A, B)
            tensors[f"{component}.{m.name}.lora_A.weight"] = A
            tensors[f"{component}.{m.name}.lora_B.weight"] = B
            names.append(f"{component}.{m.name}")
        config.update({f"{component}.{k}": v for k, v in lora_config(component, modules).items()})
    check_names(out, names, "diffusers")
    meta = {**provenance(adapter), METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    file = out / WEIGHT_NAMES[0]
    with atomic_directory(out, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, tmp / file.name, meta)
    return [file]


def lora_config(component: str, modules) -> dict:
    """The ``LoraConfig`` fields of one component: diffusers calls ``LoraConfig(**fields)`` with them."""
    ranks = {m.name: m.rank for m in modules}
    alphas = {m.name: m.scaling * m.rank for m in modules}
    r0, a0 = modal(list(ranks.values())), modal(list(alphas.values()))
    path = lambda name: _path_regex(component, name)  # noqa: E731
    return {
        "r": r0,
        "lora_alpha": a0,
        "rank_pattern": {f"^{path(n)}": r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {f"^{path(n)}": a for n, a in alphas.items() if a != a0},
        "target_modules": "|".join(path(n) for n in sorted(ranks)),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def _path_regex(component: str, name: str) -> str:
    """A regex for exactly the module at ``name``; a CLIP text encoder's ``text_model.`` is optional, since
    diffusers drops it from the weights' keys (not from the config) for a flattened ``CLIPTextModel``."""
    if component.startswith("text_encoder") and name.startswith("text_model."):
        return r"(?:text_model\.)?" + re.escape(name.removeprefix("text_model."))
    return re.escape(name)
