"""PEFT's other low-rank tuners: LoHa, LoKr and AdaLoRA adapter folders.

Same folder as a PEFT LoRA (``adapter_config.json`` + ``adapter_model.*``),
other keys and scales (``peft.tuners.{loha,lokr,adalora}``):

- ``LOHA``: ``<path>.hada_w1_a/b``, ``hada_w2_a/b``; ``s = alpha / r``
  (``rank_pattern`` / ``alpha_pattern`` applied); ΔW = s·(w1a·w1b)⊙(w2a·w2b).
- ``LOKR``: ``<path>.lokr_w1`` (or ``_a``/``_b``), ``lokr_w2`` (or ``_a``/``_b``);
  ``s = alpha / r`` even when both factors are full; ΔW = s·kron(w1, w2).
- ``ADALORA``: ``<path>.lora_A`` P (r, in), ``lora_B`` Q (out, r), ``lora_E``
  (r, 1); ΔW = c · Q · diag(E) · P / (ranknum + 1e-5). Read as ``A = diag(E) P``.
  PEFT does not save ``ranknum``; on reload it is ``init_r`` — the layer is
  built at ``init_r`` and ``resize_modules_by_rank_pattern`` copies that
  ``ranknum`` back after cutting the factors to the kept rank — so a module
  pruned to rank k < init_r is still divided by ``init_r + 1e-5``. A module
  pruned to rank 0 is a zero update (PEFT's factors are then empty): read with
  s = 0 and flagged. ``c = lora_alpha`` when it is > 0, else the module's rank;
  AdaLoRA ignores ``alpha_pattern`` / ``rank_pattern`` for the scale (its
  ``rank_pattern`` is the allocator's keep-mask).

LoKr and LoHa are rewritten in factored form by :mod:`.lycoris`.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError
from ...keys import peft_copy, strip_peft_prefix
from ...types import Adapter
from ..jsonfile import read_json
from ..peft import pattern_key
from ..tensors import check_tensor, open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans
from .lycoris import LOHA_KEYS, LOKR_KEYS, TUCKER_KEYS, conv_layout, kernel_unknown_flags, loha_parts, lokr_parts

#: PEFT's epsilon in AdaLoRA's ``scaling / (ranknum + 1e-5)``.
ADALORA_EPS = 1e-5
PEFT_TYPES = ("LOHA", "LOKR", "ADALORA")


def read(path: Path, file: Path, config: Path) -> Adapter:
    raw = read_json(config, "a PEFT adapter config")
    peft_type = str(raw.get("peft_type")).upper()
    store = open_tensor_file(file)
    roles = {"LOHA": LOHA_KEYS + TUCKER_KEYS, "LOKR": LOKR_KEYS + TUCKER_KEYS,
             "ADALORA": ("lora_A", "lora_B", "lora_E")}[peft_type]
    groups: dict[str, dict[str, str]] = {}
    others = []
    for info in store.infos():
        stem, _, leaf = strip_peft_prefix(info.name).rpartition(".")
        if leaf in roles and not peft_copy(stem):  # factors inside a modules_to_save wrapper's copies: listed apart
            groups.setdefault(stem, {})[leaf] = info.name
        else:
            others.append(info)
    tucker = [s for s, g in groups.items() if set(g) & set(TUCKER_KEYS)]
    if tucker:
        raise ConfigError(f"{config}: modules {tucker[:3]} use effective (Tucker) conv factors; lora_lens reads "
                          "LoHa/LoKr without them only.")
    alpha_key = "lora_alpha" if peft_type == "ADALORA" else "alpha"
    try:
        r0, a0 = int(raw.get("init_r" if peft_type == "ADALORA" else "r", 8)), float(raw.get(alpha_key, 8))
        rank_pattern = raw.get("rank_pattern") or {} if peft_type != "ADALORA" else {}
        alpha_pattern = raw.get("alpha_pattern") or {} if peft_type != "ADALORA" else {}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{config}: 'r' / '{alpha_key}' is not numeric ({e}).") from None
    modules, orphans, pruned = [], [], []
    for stem, g in groups.items():
        get = lambda suffix, g=g: check_tensor(store.get(g[suffix], validate=False), g[suffix], file)  # noqa: E731
        ak = pattern_key(list(alpha_pattern), stem)
        alpha = float(alpha_pattern[ak]) if ak is not None else a0
        rk = pattern_key(list(rank_pattern), stem)
        r = int(rank_pattern[rk]) if rk is not None else r0
        if peft_type == "ADALORA":
            missing = [k for k in ("lora_A", "lora_B", "lora_E") if k not in g]
            if missing:
                orphans.append(f"'{stem}' lacks {missing}")
                continue
            P, Q, E = get("lora_A"), get("lora_B"), get("lora_E")
            rank = int(P.shape[0])
            if rank == 0:
                pruned.append(stem)
            modules.append(lora_module(stem, P.double() * E.double().reshape(-1, 1), Q, kind="adalora",
                                       scaling=adalora_scaling(alpha, rank, r0), alpha=alpha, file=file,
                                       keys=(g["lora_A"], g["lora_B"])))
            continue
        if peft_type == "LOHA":
            missing = [k for k in LOHA_KEYS if k not in g]
            if missing:
                orphans.append(f"'{stem}' lacks {missing}")
                continue
            B, A, _, kernel = loha_parts(get)
        else:
            have = set(g)
            bad = [i for i in "12" if f"lokr_w{i}" not in have and not {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= have]
            if bad:
                orphans.append(f"'{stem}' lacks lokr_w{bad[0]} (or lokr_w{bad[0]}_a and _b)")
                continue
            B, A, _, _, kernel = lokr_parts(get, have)
        modules.append(lora_module(stem, A, B, scaling=alpha / r, alpha=alpha, file=file, kind=peft_type.lower(),
                                   kernel=kernel, layout=conv_layout(stem, kernel), checked=True,
                                   keys=(f"{stem} ({peft_type} A)", f"{stem} ({peft_type} B)")))
    refuse_orphans(file, orphans, "all its factors")
    refuse_empty(file, modules, f"{peft_type} keys {roles[:2]} …")
    flags = [f"AdaLoRA pruned {len(pruned)} module(s) to rank 0 ({', '.join(pruned[:3])}"
             f"{' …' if len(pruned) > 3 else ''}): zero updates, read with s = 0."] if pruned else []
    return make_adapter(path, modules, format=f"peft-{peft_type.lower()}", weights_file=file, others=others,
                        peft_type=peft_type, metadata={"peft_type": peft_type},
                        flags=flags + kernel_unknown_flags(modules))


def adalora_scaling(lora_alpha: float, rank: int, init_r: int) -> float:
    """PEFT's AdaLoRA scale on reload: ``c / (ranknum + 1e-5)`` with ``ranknum = init_r``.

    ``c`` is ``lora_alpha`` when positive, else the layer's rank (``AdaLoraLayer.update_layer``).
    PEFT rebuilds every layer at ``init_r`` and, for a pruned one, re-creates it at the kept
    rank then copies the old ``ranknum`` (init_r) back (``resize_modules_by_rank_pattern``);
    only a module pruned to rank 0 keeps ``ranknum = 0``, and its factors are empty: 0 here.
    """
    if rank == 0:
        return 0.0
    c = lora_alpha if lora_alpha > 0 else float(rank)
    return c / (init_r + ADALORA_EPS)
