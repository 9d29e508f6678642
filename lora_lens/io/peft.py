"""PEFT LoRA adapter folders: read (``load_adapter``) and write (``save_peft_adapter``).

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``adapter_model.bin``, read with ``weights_only=True``). A named adapter saved
beside the default one lives in a sub-folder of that name.

Scaling follows PEFT exactly (``peft.tuners.lora.layer.LoraLayer.update_layer``):
``s = alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
``alpha`` per module come from ``rank_pattern`` / ``alpha_pattern``, whose
first key that matches the end of the module path at a dot boundary wins
(``peft.utils.other.get_pattern_key``: ``re.match(rf"(.*\\.)?({key})$", name)``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Sequence

import torch

from .. import __version__
from ..errors import CheckpointError, ConfigError, ShapeError
from ..keys import PEFT_PREFIX, parse_module_path, parse_peft_key, peft_copy
from ..types import Adapter, LoraModule, LoraSettings, TensorInfo
from .atomic import atomic_directory, atomic_save_safetensors, atomic_write_json, register_input
from .files import missing
from .jsonfile import read_json
from .peft_config import checked_fields
from .tensors import check_tensor, factor_2d, open_tensor_file

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
#: safetensors metadata key where :func:`save_peft_adapter` records each module's
#: layout, since PEFT's ``fan_in_fan_out`` is one flag for modules that differ.
LAYOUTS_KEY = "lora_lens_layouts"

#: ``init_lora_weights`` values whose init rewrites the base weights, so that
#: ``s·B·A`` is not the change against the *original* base.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def pattern_key(pattern_keys: Sequence[str], module_name: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key matching the end of ``module_name``."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def rank_and_alpha(settings: LoraSettings, module_name: str) -> tuple[int, float]:
    """``(r, alpha)`` for one module, with ``rank_pattern`` / ``alpha_pattern`` applied."""
    rk = pattern_key(list(settings.rank_pattern), module_name)
    ak = pattern_key(list(settings.alpha_pattern), module_name)
    r = settings.rank_pattern[rk] if rk is not None else settings.r
    alpha = settings.alpha_pattern[ak] if ak is not None else settings.lora_alpha
    return int(r), float(alpha)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """``alpha / r`` (LoRA) or ``alpha / sqrt(r)`` (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def read_settings(config_path: Path) -> LoraSettings:
    """Parse ``adapter_config.json`` strictly; unknown keys are kept in ``raw`` and otherwise ignored."""
    raw = read_json(config_path, "a PEFT adapter config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{config_path}: holds a JSON {type(raw).__name__}; expected an object with 'r' and 'lora_alpha'.")
    peft_type = str(raw.get("peft_type") or "LORA").upper()
    if peft_type != "LORA":
        raise ConfigError(f"{config_path}: peft_type is {peft_type!r}; lora_lens reads LoRA adapters (peft_type 'LORA') only.")
    return LoraSettings(**checked_fields(raw, config_path), peft_type=peft_type, raw=raw)


def find_adapters(path: str | Path) -> list[tuple[str | None, Path]]:
    """Every adapter under ``path``: ``(name, folder)``; the root's own adapter has name None."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {missing(path)}; expected a PEFT adapter folder with {CONFIG_NAME}.")
    register_input(path)
    if not path.is_dir():
        if path.name in WEIGHT_NAMES or path.name == CONFIG_NAME:
            return [(_own_name(path.parent), path.parent)]
        raise CheckpointError(f"{path}: is a file; expected a PEFT adapter folder (with {CONFIG_NAME} and adapter_model.safetensors).")
    found: list[tuple[str | None, Path]] = []
    if (path / CONFIG_NAME).is_file():
        found.append((_own_name(path), path))
    inner = _init_adapter_folder(path)
    for p in sorted(path.iterdir()):
        if not p.is_dir():
            continue
        if (p / CONFIG_NAME).is_file():
            found.append((path.resolve().name if p.name == inner else p.name, p))
        elif (own := _init_adapter_folder(p)) and (p / own / CONFIG_NAME).is_file():
            found.append((p.name, p / own))  # a CondLoRA folder among named adapters (the demo's adapters/)
    if not found:
        listing = sorted(p.name for p in path.iterdir())[:8]
        what = "is empty" if not listing else f"has no {CONFIG_NAME} (found {listing})"
        raise CheckpointError(
            f"{path}: {what}; expected a PEFT adapter folder as written by save_pretrained "
            f"({CONFIG_NAME} + adapter_model.safetensors)."
        )
    return found


def _own_name(folder: Path) -> str | None:
    """The name of the adapter at ``folder``'s root: None, or OUT when ``folder`` is OUT's own adapter
    (CondLoRA's ``OUT/peft`` read directly, folder or weights file)."""
    folder = folder.resolve()
    return folder.parent.name if _init_adapter_folder(folder.parent) == folder.name else None


def _init_adapter_folder(path: Path) -> str | None:
    """The sub-folder holding an init or run folder's own PEFT adapter (CondLoRA's ``peft/``), or None.

    That adapter is the folder's, so it is named after the folder (``cl-init``), not
    after the sub-folder: every CondLoRA adapter would otherwise be called "peft".
    """
    from .initfile import INIT_NAME

    if not (path / INIT_NAME).is_file():
        return None
    d = read_json(path / INIT_NAME, "an init description written by lora-lens")
    inner = d.get("peft_adapter") if isinstance(d, dict) else None  # not an init description: no own adapter
    return inner if isinstance(inner, str) and inner not in (".", "") else None


def load_adapters(path: str | Path) -> list[Adapter]:
    """Every adapter in a folder (the root's and each named sub-folder's)."""
    return [_load_folder(folder, name) for name, folder in find_adapters(path)]


def load_adapter(path: str | Path, adapter_name: str | None = None) -> Adapter:
    """Read one PEFT LoRA adapter.

    ``path`` is an adapter folder (or its weights file). When it holds several
    named adapters and none is at its root, ``adapter_name`` picks one.
    """
    found = find_adapters(path)
    if adapter_name is not None:
        match = [(n, f) for n, f in found if n == adapter_name]
        if not match:  # CondLoRA's OUT/peft is named OUT; its folder's name (what selected it before) still does
            match = [(n, f) for n, f in found if n is not None and f.name == adapter_name]
        if not match:
            names = [n or "(root)" for n, _ in found]
            raise CheckpointError(f"{path}: no adapter named '{adapter_name}'; it holds {names}.")
        return _load_folder(match[0][1], match[0][0])
    if found[0][0] is None or found[0][1] == Path(path):  # the root's own adapter
        return _load_folder(found[0][1], found[0][0])
    if len(found) == 1:
        return _load_folder(found[0][1], found[0][0])
    raise CheckpointError(
        f"{path}: holds several named adapters {[n for n, _ in found]}; pick one with PATH/NAME or --adapter NAME."
    )


def _weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
        if (folder / name).exists() or (folder / name).is_symlink():
            return folder / name  # a folder, FIFO or broken link: the reader names what it is
    raise CheckpointError(
        f"{folder}: has {CONFIG_NAME} but no weights file; expected adapter_model.safetensors (or adapter_model.bin). "
        "The save was interrupted or the file was not copied."
    )


def _load_folder(folder: Path, adapter_name: str | None) -> Adapter:
    settings = read_settings(folder / CONFIG_NAME)
    wfile = _weights_file(folder)
    store = open_tensor_file(wfile)
    pairs: dict[str, dict[str, str]] = {}
    others: list[TensorInfo] = []
    for info in store.infos():
        pk = parse_peft_key(info.name)
        if pk.role == "other":
            others.append(TensorInfo(pk.module, info.shape, info.dtype, wfile))
        else:
            pairs.setdefault(pk.module, {})[pk.role[-1]] = info.name

    problems = [
        f"'{m}' has lora_{'A' if 'A' in p else 'B'} but no lora_{'B' if 'A' in p else 'A'}"
        for m, p in pairs.items() if len(p) != 2
    ]
    if problems:
        raise CheckpointError(
            f"{wfile}: {'; '.join(problems[:5])}{' …' if len(problems) > 5 else ''}; every LoRA module needs both factors. "
            "The file is incomplete: re-save the adapter."
        )
    if not pairs:
        raise CheckpointError(
            f"{wfile}: holds no LoRA factors (no '*.lora_A.weight' / '*.lora_B.weight' keys among {len(others)} tensors); "
            "expected a PEFT LoRA adapter."
        )

    written = _written_layouts(store)
    modules, rank_errors = [], []
    for name, p in pairs.items():
        A = check_tensor(store.get(p["A"], validate=False), p["A"], wfile)
        B = check_tensor(store.get(p["B"], validate=False), p["B"], wfile)
        embedding = parse_peft_key(p["A"]).role == "emb_A"  # the key's role, not a substring of the path
        A, kernel = factor_2d(A, "A", p["A"], wfile)
        B, _ = factor_2d(B, "B", p["B"], wfile)
        if A.shape[0] != B.shape[1]:
            raise ShapeError(
                f"{wfile}: '{name}' has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}; expected A (r, n) and B (m, r) "
                "with the same r. The adapter is corrupt."
            )
        r, alpha = rank_and_alpha(settings, name)
        if r != A.shape[0]:
            rank_errors.append(f"'{name}': config r={r}, tensors r={A.shape[0]}")
        # Linear vs Conv1D: what lora_lens wrote, else the config's hint (PEFT decides per module;
        # io.layout.with_base_layouts settles it once a base is known).
        hint = written.get(name, "conv1d" if settings.fan_in_fan_out else "linear")
        layout = "embedding" if embedding else "conv" if kernel else hint
        modules.append(LoraModule(
            name=name, key=parse_module_path(name), A=A, B=B, alpha=alpha,
            scaling=lora_scaling(alpha, int(A.shape[0]), settings.use_rslora), layout=layout, kernel=kernel,
        ))
    if rank_errors:
        raise ConfigError(
            f"{folder / CONFIG_NAME}: rank disagrees with the weights for {len(rank_errors)} module(s) "
            f"({'; '.join(rank_errors[:3])}); fix 'r' / 'rank_pattern' in the config to match the saved tensors."
        )
    modules.sort(key=lambda m: m.key.sort_key())
    flags, exact = _flags(settings, others, [m.name for m in modules])
    return Adapter(
        path=folder, settings=settings, modules=tuple(modules), other_tensors=tuple(others),
        flags=tuple(flags), delta_is_sBA=exact, adapter_name=adapter_name, weights_file=wfile,
    )


def _written_layouts(store) -> dict[str, str]:
    """``{module: linear|conv1d}`` recorded by :func:`save_peft_adapter`, or ``{}``."""
    try:
        found = json.loads(getattr(store, "metadata", {}).get(LAYOUTS_KEY, "{}"))
    except (ValueError, RecursionError):  # hostile metadata only loses the recorded layouts
        return {}
    return {str(k): v for k, v in found.items() if v in ("linear", "conv1d")} if isinstance(found, dict) else {}


def _flags(settings: LoraSettings, others: list[TensorInfo], names: Sequence[str] = ()) -> tuple[list[str], bool]:
    flags, exact = [], True
    copies = [o.name for o in others if peft_copy(o.name) and any(f".{r}." in f".{o.name}." for r in _COPY_FACTORS)]
    if copies:
        flags.append(f"modules_to_save copies: {len(copies)} LoRA factor(s) inside a wrapped layer's copies "
                     f"({', '.join(copies[:2])}{' …' if len(copies) > 2 else ''}) are listed as other tensors, never "
                     "paired; the layer's own pair (if saved) is its module.")
    # A LoRA module with a saved '<m>.base_layer.weight' whose layer PEFT also wrapped as modules_to_save
    # (named in the config, or its copies are in the file): the wrapper's copy, trained in full.
    wrapped = {c.split(".modules_to_save.")[0].split(".original_module.")[0] for c in copies}
    trained = sorted(n for n in names if f"{n}.base_layer.weight" in {o.name for o in others}
                     and (n in wrapped or _in_modules_to_save(n, settings.modules_to_save)))
    if trained:
        flags.append(f"trained base copy: {trained[:3]} also store their base weight ('<module>.base_layer.weight', "
                     "a modules_to_save copy trained in full); PEFT applies s·B·A on that copy, so the update against "
                     "the original base is (copy − W0) + s·B·A, not s·B·A.")
        exact = False
    if settings.use_dora or any(o.name.endswith("lora_magnitude_vector") for o in others):
        flags.append("DoRA: the update also rescales W0's columns by a learned magnitude; s·B·A is only its direction part.")
        exact = False
    init = str(settings.init_lora_weights).lower()
    if any(init.startswith(p) for p in BASE_REWRITING_INITS):
        flags.append(
            f"init_lora_weights={settings.init_lora_weights!r} rewrote the base weights at init; s·B·A is the change "
            "against that residual base, not the original one (unless the adapter was converted back)."
        )
        exact = False
    if any(o.name.endswith("lora_B.bias") for o in others):
        flags.append("lora_bias: the adapter also adds a bias, not part of s·B·A.")
    if settings.modules_to_save:
        flags.append(f"modules_to_save {list(settings.modules_to_save)}: fully trained copies, listed as other tensors.")
    return flags, exact


#: LoRA factor names a modules_to_save copy may hold.
_COPY_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _in_modules_to_save(name: str, modules_to_save) -> bool:
    """PEFT's rule: a ``modules_to_save`` entry names a module by its path's last components."""
    return any(name == m or name.endswith(f".{m}") for m in (modules_to_save or ()))


def _only(name: str, names: Sequence[str]) -> str:
    """The pattern key that selects ``name`` alone: PEFT's ``get_pattern_key`` matches a key at the end of a
    path, so a root module (a DiT's ``proj_out``) would also select ``single_transformer_blocks.0.proj_out``;
    such a name is anchored, ``^proj_out``."""
    return f"^{re.escape(name)}" if any(o.endswith("." + name) for o in names) else name


def save_peft_adapter(
    out_dir: str | Path,
    modules: Sequence[LoraModule],
    *,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write modules as a PEFT LoRA adapter folder, atomically.

    ``lora_alpha`` is derived from each module's ``scaling`` (``alpha = s·r``,
    or ``s·sqrt(r)`` with rsLoRA) so PEFT reproduces the scaling exactly;
    modules whose rank or alpha differ from the most common one go into
    ``rank_pattern`` / ``alpha_pattern`` under their full path, and
    ``target_modules`` lists full paths so PEFT wraps exactly these modules.
    ``extra_tensors`` (e.g. ``modules_to_save`` copies) are written under
    ``base_model.model.<name>``. ``fan_in_fan_out`` is true when any module is
    a Conv1D (PEFT re-decides it per module on load); each module's layout is
    also recorded in the file's metadata (``lora_lens_layouts``) so that
    :func:`load_adapter` reads a mixed adapter back exactly.
    """
    if not modules:
        raise ConfigError(f"{out_dir}: nothing to write; no LoRA modules were given.")
    ranks = [m.rank for m in modules]
    alphas = [m.scaling * (math.sqrt(m.rank) if use_rslora else m.rank) for m in modules]
    r0 = max(set(ranks), key=ranks.count)
    a0 = max(set(alphas), key=alphas.count)
    names = [m.name for m in modules]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r0,
        "lora_alpha": a0,
        "use_rslora": use_rslora,
        "rank_pattern": {_only(m.name, names): m.rank for m in modules if m.rank != r0},
        "alpha_pattern": {_only(m.name, names): a for m, a in zip(modules, alphas) if a != a0},
        "target_modules": sorted(m.name for m in modules),
        "fan_in_fan_out": any(m.layout == "conv1d" for m in modules),
        "modules_to_save": list(modules_to_save) if modules_to_save else None,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
    }
    tensors = {}
    for m in modules:
        if m.layout == "embedding":
            a_key, b_key = f"{PEFT_PREFIX}{m.name}.lora_embedding_A", f"{PEFT_PREFIX}{m.name}.lora_embedding_B"
        elif m.layout == "conv" and not m.kernel:
            raise ConfigError(f"'{m.name}': a Conv2d factor whose kernel size is unknown (stored flattened); "
                              "PEFT needs lora_A as (r, in, kh, kw).")
        else:
            a_key, b_key = f"{PEFT_PREFIX}{m.name}.lora_A.weight", f"{PEFT_PREFIX}{m.name}.lora_B.weight"
        A, B = m.A, m.B
        if m.layout == "conv":  # PEFT's Conv2d pair: lora_A (r, in, kh, kw), lora_B (out, r, 1, 1)
            A, B = A.reshape(A.shape[0], -1, *m.kernel), B.reshape(*B.shape, 1, 1)
        tensors[a_key] = (A.to(dtype) if dtype else A).contiguous()
        tensors[b_key] = (B.to(dtype) if dtype else B).contiguous()
    for name, t in (extra_tensors or {}).items():
        tensors[f"{PEFT_PREFIX}{name}"] = t
    layouts = {m.name: m.layout for m in modules if m.layout in ("linear", "conv1d")}
    meta = {"lora_lens_version": __version__, LAYOUTS_KEY: json.dumps(layouts), **(metadata or {})}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", meta)
        atomic_write_json(tmp / CONFIG_NAME, config)
    return Path(out_dir)
