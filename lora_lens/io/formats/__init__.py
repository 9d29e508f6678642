"""Adapters in every published format, read to one factored form: ``load_adapter`` / ``load_adapters``.

One reader per format (``peft`` in :mod:`lora_lens.io.peft`, the others
here), one detector (:mod:`.detect`) that picks among them from file names
and tensor names. Every reader returns the same :class:`~lora_lens.types.Adapter`
of modules ``ΔW = s · B A`` with a ``kind`` (lora, lokr, loha, adalora);
``Adapter.format`` says which reader. The formats and their rules are in
docs/formats.md.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import CheckpointError
from ...types import Adapter
from .. import peft
from ..atomic import register_input
from .detect import FORMATS, WEIGHT_SUFFIXES, Found, detect


def load_adapters(path: str | Path, format: str | None = None) -> list[Adapter]:
    """Every adapter at ``path``: a PEFT folder may hold several named ones, every other format one."""
    found = _found(path, format)
    if found.format == "peft":
        return peft.load_adapters(found.path if found.path.is_dir() else found.file.parent)
    return [_read(found)]


def load_adapter(path: str | Path, adapter_name: str | None = None, format: str | None = None) -> Adapter:
    """Read one adapter of any format (``format`` forces the reader; see :data:`FORMATS`).

    ``adapter_name`` picks a named adapter of a PEFT folder that holds several.
    """
    found = _found(path, format)
    if found.format == "peft":
        return peft.load_adapter(found.path if found.path.is_dir() else found.file.parent, adapter_name)
    if adapter_name is not None:
        raise CheckpointError(f"{path}: a {found.format} adapter holds one adapter; --adapter/adapter_name applies "
                              "to PEFT folders with named sub-folders only.")
    return _read(found)


def _found(path: str | Path, format: str | None) -> Found:
    register_input(Path(path))
    found = detect(path, format)
    if found is None:
        raise CheckpointError(_no_adapter(Path(path)))
    return found


def _no_adapter(path: Path) -> str:
    """Why nothing at ``path`` reads as an adapter: only a file of tensors is called a base checkpoint
    (a train_log.json or an empty folder passed by mistake is not one)."""
    expected = "expected an adapter folder (adapter_config.json + weights) or an adapter weights file"
    if path.is_file() and path.suffix not in WEIGHT_SUFFIXES:
        return f"{path}: is not a weights file ('{path.suffix}'); {expected} ({', '.join(WEIGHT_SUFFIXES)})."
    if path.is_dir() and not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir() if p.is_file()):
        return f"{path}: holds no adapter and no weights file; {expected}."
    return (f"{path}: holds no adapter (no LoRA/LoKr/LoHa factor names found: it looks like a base checkpoint); "
            f"{expected}. Pass --format NAME to read it as one of {list(FORMATS)}, or pass it as --base.")


def _read(found: Found) -> Adapter:
    from . import diffusers, kohya, lora_diffusion, mlx, peft_tuners, state_dict

    if found.format.startswith("peft-"):
        return peft_tuners.read(found.path, found.file, found.config)
    reader = {"mlx": mlx.read, "kohya": kohya.read, "lycoris": kohya.read, "diffusers": diffusers.read,
              "lora_diffusion": lora_diffusion.read, "state_dict": state_dict.read}[found.format]
    return reader(found.path, found.file)


__all__ = ["FORMATS", "Found", "detect", "load_adapter", "load_adapters"]
