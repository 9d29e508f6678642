"""Which reader a path needs: file names first, then the tensor names (never the tensor data).

``detect(path)`` returns a :class:`Found` (format, weights file, config) for
an adapter, or None for something that is not one (a base checkpoint). It
refuses, in one line naming the files, what must not be guessed: a folder
with several unrelated weight files and no index, tuners that are not a
low-rank update (IA3, OFT/BOFT, VeRA, prompt tuning …), and a file whose
tensors pair up as low-rank factors under a naming no reader detects
(:func:`low_rank_pairs`): such a file is never called a base checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointError, ConfigError
from ...keys import adapter_key_scheme, split_pair_token
from ...types import TensorInfo
from ..files import missing
from ..jsonfile import read_json
from ..tensors import PICKLE_SUFFIXES, open_tensor_file
from . import diffusers, mlx

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
#: peft_type values read as a LoRA folder / by ``peft_tuners``.
LOW_RANK_PEFT_TYPES = ("LORA", "LOHA", "LOKR", "ADALORA")
#: Every ``--format`` name.
FORMATS = ("peft", "mlx", "kohya", "lycoris", "diffusers", "lora_diffusion", "state_dict")
WEIGHT_SUFFIXES = (".safetensors", ".npz") + PICKLE_SUFFIXES
#: ``model-00001-of-00003.safetensors``: shards of one checkpoint even without an index.
SHARD_NAME = re.compile(r".*-\d{3,5}-of-\d{3,5}\.\w+$")
#: Files of a base model folder; their presence makes the folder a base.
BASE_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
              "pytorch_model.bin", "diffusion_pytorch_model.safetensors")


@dataclass(frozen=True)
class Found:
    """An adapter's format, the weights file to read and its config (if any)."""

    format: str
    path: Path
    file: Path
    config: Path | None = None


def not_low_rank(where: Path, tuner: str) -> ConfigError:
    return ConfigError(f"{where}: is {'an' if tuner[0] in 'AEIOU' else 'a'} {tuner} adapter: not a low-rank update "
                       "(ΔW = s·B·A), so spectra and subspaces of it are not defined; lora_lens reads LoRA, LoKr, "
                       "LoHa and AdaLoRA adapters.")


def detect(path: str | Path, format: str | None = None) -> Found | None:
    """The adapter at ``path`` (file or folder), or None when it holds no adapter (a base).

    ``format`` forces the reader (one of :data:`FORMATS`); the weights file is still found the same way.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: {missing(path)}; expected an adapter (folder or file) or a checkpoint.")
    if format is not None and format not in FORMATS:
        raise ConfigError(f"--format {format!r}: unknown; expected one of {list(FORMATS)}.")
    if path.is_dir():
        return _folder(path, format)
    if path.name == PEFT_CONFIG:
        return _folder(path.parent, format)
    if path.name in PEFT_WEIGHTS and (path.parent / PEFT_CONFIG).is_file():
        return _folder(path.parent, format)
    return _file(path, path, format)


def _folder(folder: Path, format: str | None) -> Found | None:
    config = folder / PEFT_CONFIG
    mlx_file = next((folder / n for n in mlx.WEIGHT_NAMES if _present(folder / n)), None)
    if config.is_file():
        raw = _json(config)
        if format == "mlx" or (format is None and (mlx.is_mlx_config(raw) or mlx_file is not None)):
            if mlx_file is None:
                said = "MLX adapter config" if mlx.is_mlx_config(raw) else f"--format mlx, and {PEFT_CONFIG}"
                raise CheckpointError(f"{folder}: {said} but no {' or '.join(mlx.WEIGHT_NAMES)}; "
                                      "the save was interrupted or the file was not copied"
                                      + ("." if mlx.is_mlx_config(raw) else ", or the folder is PEFT's: drop --format."))
            return Found("mlx", folder, mlx_file, config)
        if format is not None and format != "peft":
            # kohya/diffusers/LyCORIS/state-dict readers read one weights file, never a PEFT config folder
            raise ConfigError(f"{folder}: is a PEFT adapter folder ({PEFT_CONFIG}); --format {format} reads a single "
                              f"{format} weights file. Pass that file's path, or drop --format.")
        peft_type = str(raw.get("peft_type") or "LORA").upper()
        if peft_type not in LOW_RANK_PEFT_TYPES:
            raise not_low_rank(folder, _tuner_name(peft_type))
        weights = next((folder / n for n in PEFT_WEIGHTS if _present(folder / n)), None)
        if weights is None:
            raise CheckpointError(
                f"{folder}: has {PEFT_CONFIG} but no weights file; expected adapter_model.safetensors (or "
                "adapter_model.bin). The save was interrupted or the file was not copied.")
        return Found("peft" if peft_type == "LORA" else f"peft-{peft_type.lower()}", folder, weights, config)
    if mlx_file is not None:
        return Found("mlx", folder, mlx_file, None)
    if any(c.is_dir() and (c / PEFT_CONFIG).is_file() for c in folder.iterdir()):
        return Found("peft", folder, folder, None)  # named adapters, one per sub-folder
    for name in diffusers.WEIGHT_NAMES:
        if (folder / name).is_file():
            return _file(folder, folder / name, format or "diffusers")
    if any((folder / n).is_file() for n in BASE_FILES):
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return _file(folder, files[0], format)
    if len(files) > 1 and not all(SHARD_NAME.match(p.name) for p in files):
        raise refuse_several(folder, files)
    return None


def refuse_several(folder: Path, files: list[Path]) -> CheckpointError:
    shown = ", ".join(p.name for p in files[:6]) + (f" and {len(files) - 6} more" if len(files) > 6 else "")
    return CheckpointError(
        f"{folder}: holds {len(files)} weight files ({shown}) and no *.index.json, so they are not known to be shards "
        f"of one checkpoint; pick one by passing its path, e.g. {folder / files[0].name}."
    )


def _file(path: Path, file: Path, format: str | None) -> Found | None:
    if file.suffix not in WEIGHT_SUFFIXES:
        return None
    if format is not None:
        return Found(format, path, file, None)
    if file.name in mlx.WEIGHT_NAMES:
        return Found("mlx", path, file, None)
    store = open_tensor_file(file)
    scheme = adapter_key_scheme(store.names())
    if scheme is None:
        pairs = low_rank_pairs(store.infos())
        if pairs:
            raise refuse_unnamed_pairs(file, pairs)
        return None
    if scheme.startswith("not-low-rank:"):
        raise not_low_rank(file, scheme.split(":", 1)[1])
    return Found(scheme, path, file, None)


def low_rank_pairs(infos) -> list[tuple[TensorInfo, TensorInfo]]:
    """Tensors that pair up as low-rank factors under any naming: names that differ only by a factor token
    (:func:`lora_lens.keys.split_pair_token`: ``X.down``/``X.up``, ``X:down``/``X:up``, ``X.lora_A``/``X.lora_B``
    …) whose shapes share a rank r below both other sides: ``(r, n)`` with ``(m, r)`` (Conv2d ``(r, in, kh, kw)``
    with ``(m, r, 1, 1)``), or ``(n, r)`` with ``(r, m)``."""
    sides: dict[tuple[str, str], dict[int, TensorInfo]] = {}
    for info in infos:
        split = split_pair_token(info.name)
        if split is not None and len(info.shape) in (2, 4):
            sides.setdefault(split[:2], {})[split[2]] = info
    pairs = []
    for g in sides.values():
        if len(g) == 2:
            x, y = g[0].shape, g[1].shape
            torch_way = x[0] == y[1] and x[0] < min(_numel(x[1:]), y[0])
            math_way = len(x) == len(y) == 2 and x[1] == y[0] and x[1] < min(x[0], y[1])
            if torch_way or math_way:
                pairs.append((g[0], g[1]))
    return pairs


def refuse_unnamed_pairs(file: Path, pairs) -> CheckpointError:
    """A file that pairs up as low-rank factors under a naming no reader detects: never a base, refused by name."""
    x, y = pairs[0]
    more = f" and {len(pairs) - 1} more pair(s)" if len(pairs) > 1 else ""
    return CheckpointError(
        f"{file}: its tensors pair up as low-rank factors ('{x.name}' {tuple(x.shape)} / '{y.name}' {tuple(y.shape)}"
        f"{more}) under a naming no reader detects, so it is not read as a base checkpoint; read it as an adapter "
        "with --format state_dict, or pass a model checkpoint as --base.")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _tuner_name(peft_type: str) -> str:
    return {"IA3": "IA3", "OFT": "OFT", "BOFT": "BOFT", "VERA": "VeRA", "PROMPT_TUNING": "prompt tuning",
            "P_TUNING": "p-tuning", "PREFIX_TUNING": "prefix tuning"}.get(peft_type, peft_type)


def _present(p: Path) -> bool:
    """Something is there (a FIFO, a folder or a broken link too: the reader names what it is)."""
    return p.exists() or p.is_symlink()


def _json(p: Path) -> dict:
    raw = read_json(p, "an adapter config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: holds a JSON {type(raw).__name__}; expected an object.")
    return raw
