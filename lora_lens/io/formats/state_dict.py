"""Research state dicts: LoRA factor pairs under any naming (loralib, nanoGPT-LoRA, LoRA-ViT, nested dicts).

One generic rule pairs tensors: two names that differ only by a known pair of
tokens (:data:`lora_lens.keys.PAIR_TOKENS`: ``lora_A/lora_B``,
``lora_a/lora_b``, ``lora_down/lora_up``, ``down/up``, ``w_a/w_b``, ``A/B``),
the first applied to the input. The orientation comes from the shapes:

- ``X (r, n)``, ``Y (m, r)`` (loralib, LoRA-ViT's ``nn.Linear`` weights):
  ``A = X``, ``B = Y``;
- ``X (n, r)``, ``Y (r, m)`` (``x @ A @ B`` code, nanoGPT-LoRA): ``A = Xᵀ``, ``B = Yᵀ``.

When both fit (square factors) the reading with the smaller rank wins; with
equal ranks it is ambiguous, read the first way and flagged. Scale: a
``<module>.alpha`` tensor (``alpha / r``); else the file's metadata
(safetensors metadata or a nested ``"metadata"`` dict: ``scale``/``scaling``, or
``alpha``/``lora_alpha`` with the rank) or a sidecar ``<file>.json``; else 1,
flagged ``scale-unknown``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ConfigError, ShapeError
from ...keys import split_pair_token
from ...types import Adapter
from ..jsonfile import read_json
from ..tensors import check_tensor, open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans, scalar


def read(path: Path, file: Path) -> Adapter:
    store = open_tensor_file(file)
    groups: dict[tuple[str, str], dict[int, str]] = {}
    names = set(store.names())
    others = []
    for info in store.infos():
        split = split_pair_token(info.name)
        if split is None or len(info.shape) != 2:
            if not info.name.endswith(".alpha"):
                others.append(info)
            continue
        stem, pair, side = split
        groups.setdefault((stem, pair), {})[side] = info.name
    orphans = [f"'{g[next(iter(g))]}' has no partner ({pair.split('/')[1 - next(iter(g))]})"
               for (stem, pair), g in groups.items() if len(g) != 2]
    refuse_orphans(file, orphans, "both factors of its pair")
    default_scale, alpha_meta = _file_scale(store, file)
    modules, ambiguous, unknown = [], [], []
    for (stem, pair), g in groups.items():
        X, Y = store.get(g[0], validate=False), store.get(g[1], validate=False)
        A, B, amb = _orient(X, Y, (g[0], g[1]), file)
        if amb:
            ambiguous.append(stem)
        r = int(A.shape[0])
        alpha_key = next((k for k in (f"{stem}.alpha", f"{stem}.lora_alpha") if k in names), None)
        if alpha_key:
            alpha = scalar(check_tensor(store.get(alpha_key, validate=False), alpha_key, file), alpha_key, file)
            scale = alpha / r
        elif default_scale is not None:
            scale, alpha = default_scale, default_scale * r
        elif alpha_meta is not None:
            scale, alpha = alpha_meta / r, alpha_meta
        else:
            scale, alpha = 1.0, float(r)
            unknown.append(stem)
        modules.append(lora_module(stem, A, B, scaling=scale, alpha=alpha, file=file, keys=(g[0], g[1])))
    refuse_empty(file, modules, "pairs such as '<m>.lora_A' / '<m>.lora_B' or 'w_a_N' / 'w_b_N'")
    flags = []
    if ambiguous:
        flags.append(f"orientation ambiguous for {len(ambiguous)} module(s) with square factors ({ambiguous[:2]}): "
                     "read as A (r, n), B (m, r); pass --format of the source format if that is wrong.")
    return make_adapter(path, modules, format="state_dict", weights_file=file, others=others, flags=flags,
                        scale_unknown=unknown)


def _orient(X: torch.Tensor, Y: torch.Tensor, keys: tuple[str, str], file: Path):
    """``(A (r, n), B (m, r), ambiguous)`` from the input-side ``X`` and output-side ``Y``."""
    torch_way = X.shape[0] == Y.shape[1]  # X (r, n), Y (m, r)
    math_way = X.shape[1] == Y.shape[0]  # X (n, r), Y (r, m)
    if torch_way and math_way:
        if X.shape[0] != X.shape[1]:
            math_way = X.shape[1] < X.shape[0]
            torch_way = not math_way
        else:
            return X, Y, True
    if torch_way:
        return X, Y, False
    if math_way:
        return X.T, Y.T, False
    raise ShapeError(f"{file}: '{keys[0]}' {tuple(X.shape)} and '{keys[1]}' {tuple(Y.shape)} share no rank "
                     "dimension; expected A (r, n) with B (m, r), or A (n, r) with B (r, m).")


def _file_scale(store, file: Path) -> tuple[float | None, float | None]:
    """``(scale, alpha)`` from the file's metadata or a sidecar ``<file>.json``; None where not given."""
    meta = dict(getattr(store, "metadata", {}) or {})
    sidecar = file.with_suffix(".json")
    if sidecar.is_file():
        side = read_json(sidecar, "the adapter's settings")
        if isinstance(side, dict):
            meta.update(side.get("lora_parameters", side))
    try:
        scale = next((float(meta[k]) for k in ("scale", "scaling", "lora_scale") if k in meta), None)
        alpha = next((float(meta[k]) for k in ("alpha", "lora_alpha") if k in meta), None)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{file}: metadata scale/alpha is not a number ({e}).") from None
    return scale, alpha
