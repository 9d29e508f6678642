"""kohya / sd-scripts LoRA files, and LyCORIS files that use kohya's names (LoCon, LoKr, LoHa).

Keys: ``lora_unet_<path>``, ``lora_te_<path>`` (SD1/2), ``lora_te1_`` /
``lora_te2_`` (SDXL), ``lora_transformer_`` — a diffusers module path with
dots written as underscores — followed by

- ``.lora_down.weight`` A (r, in) or conv (r, in, kh, kw), ``.lora_up.weight``
  B (out, r) or conv (out, r, 1, 1), ``.alpha``: ``ΔW = (alpha / r) · B A``,
  alpha = r when absent or 0 (sd-scripts' ``LoRAModule``: ``alpha = dim if
  alpha is None or alpha == 0``; LyCORIS modules do the same);
- LyCORIS ``.hada_w1_a/b``, ``.hada_w2_a/b`` (LoHa) or ``.lokr_w1[_a/_b]``,
  ``.lokr_w2[_a/_b]`` (LoKr), scale ``alpha / dim``; a LoKr whose two factors
  are both full uses scale 1 (LyCORIS ``LokrModule``);
- ``.dora_scale``: a DoRA magnitude (flagged).

Module names are mapped to diffusers paths (``unet.down_blocks.0.…``, see
:func:`lora_lens.keys.kohya_module_path`) and keep the stored name in
``stored_as``. ``ss_*`` safetensors metadata (sd-scripts' training settings)
is kept in ``Adapter.metadata``.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import CheckpointError
from ...keys import kohya_module_path
from ...types import Adapter, TensorInfo
from ..tensors import TensorStore, check_tensor, open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans, scalar
from .lycoris import LOHA_KEYS, LOKR_KEYS, TUCKER_KEYS, conv_layout, kernel_unknown_flags, loha_parts, lokr_parts

_ROLE = re.compile(r"^(?P<stem>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale|"
                   + "|".join(LOKR_KEYS + LOHA_KEYS + TUCKER_KEYS) + r")$")


def read(path: Path, file: Path, format: str = "kohya") -> Adapter:
    """Read a kohya / LyCORIS file (``path`` is what the user gave, ``file`` the weights)."""
    store = open_tensor_file(file)
    groups: dict[str, dict[str, str]] = {}
    others: list[TensorInfo] = []
    for info in store.infos():
        m = _ROLE.match(info.name)
        if m is None:
            others.append(info)
        else:
            groups.setdefault(m["stem"], {})[m["role"].removesuffix(".weight")] = info.name
    modules, orphans, flags = [], [], []
    tucker = [s for s, g in groups.items() if set(g) & set(TUCKER_KEYS)]
    if tucker:
        raise CheckpointError(f"{file}: module(s) {tucker[:3]} use a Tucker core ({sorted(set(groups[tucker[0]]) & set(TUCKER_KEYS))}); "
                              "lora_lens reads LoRA, LoCon, LoKr and LoHa without Tucker cores only.")
    for stem, g in groups.items():
        module = _module(store, file, stem, g, orphans)
        if module is not None:
            modules.append(module)
    refuse_orphans(file, orphans)
    refuse_empty(file, modules, "'<name>.lora_down.weight' / '.lora_up.weight', '.hada_w1_a', '.lokr_w1' keys")
    if any("dora_scale" in g for g in groups.values()):
        flags.append("DoRA (dora_scale): the update also rescales W0's columns; s·B·A is only its direction part.")
    flags += kernel_unknown_flags(modules)
    kinds = {m.kind for m in modules}
    fmt = "lycoris" if kinds - {"lora"} else format
    meta = {k: v for k, v in getattr(store, "metadata", {}).items() if k.startswith(("ss_", "modelspec."))}
    return make_adapter(path, modules, format=fmt, weights_file=file, others=others, flags=flags,
                        exact=not any("dora_scale" in g for g in groups.values()), metadata=meta)


def _module(store: TensorStore, file: Path, stem: str, g: dict[str, str], orphans: list[str]):
    name = kohya_module_path(stem) or stem
    alpha_t = check_tensor(store.get(g["alpha"], validate=False), g["alpha"], file) if "alpha" in g else None
    get = lambda suffix: check_tensor(store.get(g[suffix], validate=False), g[suffix], file)  # noqa: E731
    if "lora_down" in g or "lora_up" in g:
        if len(set(g) & {"lora_down", "lora_up"}) != 2:
            have = "lora_down" if "lora_down" in g else "lora_up"
            orphans.append(f"'{stem}' has {have} but not {'lora_up' if have == 'lora_down' else 'lora_down'}")
            return None
        A, B = get("lora_down"), get("lora_up")
        r = int(A.shape[0])
        alpha = _alpha(alpha_t, g, file, r)
        return lora_module(name, A, B, scaling=alpha / r, alpha=alpha, file=file,
                           keys=(g["lora_down"], g["lora_up"]), stored_as=stem)
    kernel = ()
    if any(k.startswith("hada_") for k in g):
        missing = [k for k in LOHA_KEYS if k not in g]
        if missing:
            orphans.append(f"LoHa '{stem}' lacks {missing}")
            return None
        B, A, dim, kernel = loha_parts(get)
        kind, scale_of = "loha", (lambda alpha: alpha / dim)
    elif any(k.startswith("lokr_") for k in g):
        have = set(g)
        bad = [i for i in "12" if f"lokr_w{i}" not in have and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= have]
        if bad:
            orphans.append(f"LoKr '{stem}' lacks lokr_w{bad[0]} (or lokr_w{bad[0]}_a and _b)")
            return None
        B, A, dim, both_full, kernel = lokr_parts(get, have)
        kind = "lokr"
        scale_of = (lambda alpha: 1.0) if both_full else (lambda alpha: alpha / dim)
    else:  # only an alpha or a dora_scale: not a module
        orphans.append(f"'{stem}' has only {sorted(g)}")
        return None
    alpha = _alpha(alpha_t, g, file, dim or 1)
    dora = store.get(g["dora_scale"], validate=False) if "dora_scale" in g else None
    return lora_module(name, A, B, scaling=scale_of(alpha), alpha=alpha, file=file,
                       keys=(f"{stem}.{kind} A", f"{stem}.{kind} B"), kind=kind, stored_as=stem, kernel=kernel,
                       layout=conv_layout(name, kernel, dora), checked=True)


def _alpha(alpha_t, g: dict[str, str], file: Path, dim: int) -> float:
    """The module's alpha: its ``.alpha`` tensor, with an absent or zero alpha meaning ``dim``
    (sd-scripts' ``LoRAModule`` and every LyCORIS module: ``alpha = dim if alpha is None or alpha == 0``)."""
    alpha = scalar(alpha_t, g["alpha"], file) if alpha_t is not None else 0.0
    return alpha if alpha != 0 else float(dim)
