"""MLX-LM adapter folders: ``adapters.safetensors`` (or the old ``adapters.npz``) + ``adapter_config.json``.

Keys ``<module>.lora_a`` (in, r) and ``<module>.lora_b`` (r, out): MLX
computes ``y = x W0ᵀ + scale · (x · lora_a) · lora_b``, so
``ΔW = scale · (lora_a · lora_b)ᵀ``, i.e. ``B = lora_bᵀ (out, r)`` and
``A = lora_aᵀ (r, in)``. ``scale`` comes from the config's
``lora_parameters.scale``; a config with only ``alpha`` gives ``alpha / rank``;
neither: ``scale-unknown`` (read as 1). Module paths are MLX-LM's, which are
the Hugging Face ones (``model.layers.0.self_attn.q_proj``). ``fine_tune_type:
dora`` (or ``.m`` magnitudes) is flagged as for PEFT; ``full`` is refused.
``.npz`` files are read with ``numpy.load(allow_pickle=False)`` only.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ConfigError, ShapeError
from ...types import Adapter
from ..jsonfile import read_json
from ..tensors import open_tensor_file
from .factors import lora_module, make_adapter, refuse_empty, refuse_orphans

WEIGHT_NAMES = ("adapters.safetensors", "adapters.npz")
CONFIG_NAME = "adapter_config.json"


def is_mlx_config(raw: dict) -> bool:
    """An ``adapter_config.json`` written by MLX-LM (not PEFT)."""
    return "lora_parameters" in raw or "fine_tune_type" in raw or ("peft_type" not in raw and "lora_layers" in raw)


def _config(folder: Path) -> dict:
    p = folder / CONFIG_NAME
    if not p.is_file():
        return {}
    raw = read_json(p, "MLX-LM's adapter config")
    return raw if isinstance(raw, dict) else {}


def read(path: Path, file: Path) -> Adapter:
    raw = _config(file.parent)
    tune = str(raw.get("fine_tune_type", "lora")).lower()
    if tune == "full":
        raise ConfigError(f"{file.parent / CONFIG_NAME}: fine_tune_type is 'full': a full fine-tune, not a low-rank "
                          "update; compare its weights with the base directly.")
    params = raw.get("lora_parameters") or {}
    rank_cfg = params.get("rank")
    scale, unknown = params.get("scale"), False
    if scale is None and params.get("alpha") is not None and rank_cfg:
        scale = float(params["alpha"]) / float(rank_cfg)
    if scale is None:
        scale, unknown = 1.0, True
    store = open_tensor_file(file)
    pairs: dict[str, dict[str, str]] = {}
    others = []
    for info in store.infos():
        stem, _, leaf = info.name.rpartition(".")
        if leaf in ("lora_a", "lora_b"):
            pairs.setdefault(stem, {})[leaf] = info.name
        else:
            others.append(info)
    orphans = [f"'{m}' has {next(iter(p))} but not {'lora_b' if 'lora_a' in p else 'lora_a'}"
               for m, p in pairs.items() if len(p) != 2]
    refuse_orphans(file, orphans, "lora_a and lora_b")
    modules = []
    for name, p in pairs.items():
        a, b = store.get(p["lora_a"], validate=False), store.get(p["lora_b"], validate=False)
        if a.dim() != 2 or b.dim() != 2:
            raise ShapeError(f"{file}: '{p['lora_a']}' {tuple(a.shape)} / '{p['lora_b']}' {tuple(b.shape)}: expected "
                             "2-D lora_a (in, r) and lora_b (r, out); MoE (switch) LoRA layers are not read.")
        layout = "embedding" if name.endswith(("embed_tokens", "wte", "word_embeddings")) else "linear"
        modules.append(lora_module(name, a.T, b.T, scaling=float(scale), alpha=float(scale) * a.shape[1], file=file,
                                   keys=(p["lora_a"], p["lora_b"]), layout=layout))
    refuse_empty(file, modules, "'<module>.lora_a' / '<module>.lora_b' keys")
    if rank_cfg and any(m.rank != int(rank_cfg) for m in modules):
        bad = [(m.name, m.rank) for m in modules if m.rank != int(rank_cfg)][:3]
        raise ConfigError(f"{file.parent / CONFIG_NAME}: lora_parameters.rank = {rank_cfg} but the weights have rank "
                          f"{bad}; fix the config to match the saved tensors.")
    flags = []
    dora = tune == "dora" or any(o.name.endswith(".m") for o in others)
    if dora:
        flags.append("DoRA: the update also rescales W0's columns by a learned magnitude (.m); "
                     "s·B·A is only its direction part.")
    return make_adapter(path, modules, format="mlx", weights_file=file, others=others, flags=flags, exact=not dora,
                        scale_unknown=[m.name for m in modules] if unknown else (), metadata={
                            k: raw[k] for k in ("fine_tune_type", "model", "num_layers") if k in raw})
