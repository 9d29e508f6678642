"""cloneofsimo/lora ``lora_diffusion`` files (``save_safeloras_with_embeds``): LoRA pairs by injection index.

Keys ``<component>:<i>:up`` ``B (out, r)`` — Conv2d ``(out, r, 1, 1)`` — and
``<component>:<i>:down`` ``A (r, in)`` — Conv2d ``(r, in, kh, kw)`` — for
``component`` ``unet``, ``text_encoder`` …; safetensors metadata
``<component>`` = the JSON list of the module classes LoRA was injected under
(``["CrossAttention", "Attention", "GEGLU"]``), ``<component>:<i>:rank`` = r,
and ``<token>`` = ``"<embed>"`` for a textual-inversion embedding stored under
the token itself (``<s1>``).

Scale: ``extract_lora_as_tensor`` saves ``lora_up.weight · scale`` (the
training ``LoraInjectedLinear.scale``, default 1.0) and the loader
(``monkeypatch_or_replace_lora``) builds new layers with ``scale = 1.0``, so
``ΔW = up · down`` exactly: ``s = 1`` (a ``tune_lora_scale`` at inference is a
user multiplier, not part of the file).

Names: modules stay ``<component>:<i>``. The index is the position in
``_find_modules`` over the live model (every injected Linear / Conv2d under a
module whose class name is in the target list, in ``named_modules`` order):
it depends on the diffusers / transformers classes of the training run (the
registration order inside ``CrossAttention``/``Attention``, ``CLIPAttention``'s
``k_proj, v_proj, q_proj, out_proj``) and on which injection function ran, none of
which a weights file records, and shapes cannot tell ``to_k`` from ``to_v``.
So the indices are not mapped to module paths (docs/formats.md).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from ...errors import CheckpointError
from ...types import Adapter, LayerKey
from ..tensors import open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans

#: ``unet:12:up``: component, injection index, direction.
KEY = re.compile(r"^(?P<comp>[^:.]+):(?P<idx>\d+):(?P<dir>up|down)$")
#: Metadata value marking a textual-inversion embedding (``EMBED_FLAG`` in lora_diffusion/lora.py).
EMBED_FLAG = "<embed>"


def read(path: Path, file: Path) -> Adapter:
    store = open_tensor_file(file)
    meta = dict(getattr(store, "metadata", {}) or {})
    groups: dict[tuple[str, int], dict[str, str]] = {}
    others = []
    for info in store.infos():
        m = KEY.match(info.name)
        if m is None:
            others.append(info)
        else:
            groups.setdefault((m["comp"], int(m["idx"])), {})[m["dir"]] = info.name
    refuse_orphans(file, [f"'{c}:{i}' has {next(iter(g))} but not {'down' if 'up' in g else 'up'}"
                          for (c, i), g in groups.items() if len(g) != 2], "both 'up' and 'down'")
    modules, wrong_rank = [], []
    for (comp, idx), g in groups.items():
        name = f"{comp}:{idx}"
        down, up = store.get(g["down"], validate=False), store.get(g["up"], validate=False)
        module = lora_module(name, down, up, scaling=1.0, alpha=float(down.shape[0]), file=file,
                             keys=(g["down"], g["up"]))
        said = meta.get(f"{name}:rank")
        if said is not None and said.strip() != str(module.rank):
            wrong_rank.append(f"'{name}:rank' = {said!r} but the tensors have r = {module.rank}")
        # ordered by injection index within each component (a string sort would put 10 before 2)
        modules.append(replace(module, key=LayerKey(comp, idx, comp)))
    if wrong_rank:
        raise CheckpointError(f"{file}: metadata {'; '.join(wrong_rank[:3])}; the file is inconsistent, re-save it.")
    refuse_empty(file, modules, "'<component>:<i>:up' / '<component>:<i>:down' keys")
    embeds = [t.name for t in others if meta.get(t.name) == EMBED_FLAG]
    flags = [f"lora_diffusion: modules are named by injection index ({', '.join(f'{c}:<i>' for c in sorted({c for c, _ in groups}))}); "
             "the file does not record which module path each index is (it depends on the library versions of the "
             "training run), so they compare by index only with other lora_diffusion files."]
    if embeds:
        flags.append(f"textual-inversion embeddings {embeds[:4]}{' …' if len(embeds) > 4 else ''}: "
                     "listed as other tensors.")
    # the target module classes of each component, as the file writes them (a JSON list)
    targets = {c: meta[c] for c in sorted({c for c, _ in groups}) if c in meta}
    return make_adapter(path, modules, format="lora_diffusion", weights_file=file, others=others, flags=flags,
                        metadata=targets)
