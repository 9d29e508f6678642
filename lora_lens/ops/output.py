"""Where an operation's result goes: the one place resize and merge write adapters.

Each operation returns a new :class:`~lora_lens.types.Adapter`; :func:`write_result`
writes it in a target format. ``--to`` defaults to the input's format
(:func:`default_target`): PEFT for PEFT folders (LoRA and the PEFT LoHa / LoKr /
AdaLoRA tuners, whose result is plain LoRA), kohya for kohya and LyCORIS files,
MLX, diffusers; PEFT for research state dicts, which have no format of their own.

PEFT is written here (keeping a PEFT source's ``modules_to_save`` copies, rsLoRA and task
type); kohya / MLX / diffusers go through :func:`lora_lens.io.write_adapter`, the writers
``lora-lens convert`` uses, which own each format's names and scale rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, NonFiniteError
from ..io.convert import components
from ..io.peft import save_peft_adapter
from ..io.tensors import open_tensor_file
from ..io.write import WRITE_FORMATS, write_adapter
from ..jsonable import JsonFields
from ..keys import parse_peft_key, strip_peft_prefix
from ..types import Adapter

@dataclass(frozen=True)
class Operated:
    """An operation's adapter (not written), one record per module, and notes (resize, merge)."""

    adapter: Adapter
    records: tuple[dict, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class WrittenResult(JsonFields):
    """What an operation wrote: the folder, the files or folders written, the format, one record per module, a
    summary and notes. Each operation's result subclasses it with its own JSON ``KIND``."""

    out_dir: Path
    written: tuple[Path, ...]
    to: str
    records: tuple[dict, ...]
    summary: dict
    notes: tuple[str, ...] = ()


#: Formats an operation can write (``--to``): every format lora_lens writes.
TARGETS = WRITE_FORMATS


def default_target(fmt: str) -> str:
    """The format an adapter read as ``fmt`` is written back in when ``--to`` is not given."""
    if fmt.startswith("peft") or fmt in ("state_dict", "lora_diffusion"):  # lora_diffusion: PEFT refuses it, saying why
        return "peft"
    return "kohya" if fmt == "lycoris" else fmt


def check_target(to: str | None) -> None:
    if to is not None and to not in TARGETS:
        raise ConfigError(f"--to {to!r}: unknown output format; expected one of {', '.join(TARGETS)}.")


def check_finite(adapter: Adapter, what: str) -> None:
    """Refuse a result holding NaN/Inf (never written), naming the first modules at fault."""
    # one float64 reduction per factor: NaN/Inf propagate into the sum (a bool mask per factor cost 10× more)
    bad = [m.name for m in adapter.modules
           if not (math.isfinite(float(m.A.sum(dtype=torch.float64))) and math.isfinite(float(m.B.sum(dtype=torch.float64))))]
    if bad:
        shown = ", ".join(f"'{b}'" for b in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{what} produced NaN/Inf in {len(bad)} module(s) ({shown}); nothing was written. "
                             f"Expected finite factors: the inputs overflow their dtype; rerun with --dtype float64.")


def write_result(adapter: Adapter, out: str | Path, to: str, *, overwrite: bool = False) -> list[Path]:
    """Write ``adapter`` as ``to`` under ``out`` (atomically); returns the folders/files written.

    PEFT: one folder, or one per diffusion component (``OUT/unet``, …) as
    :func:`~lora_lens.io.convert.convert_to_peft` splits them; ``adapter.metadata``
    (the provenance) goes into the safetensors metadata, ``modules_to_save``
    copies of a PEFT source are carried over.
    """
    check_target(to)
    check_finite(adapter, "the operation")
    if to != "peft" or adapter.format == "lora_diffusion":  # the latter: refused there (injection-index names)
        return write_adapter(adapter, out, to=to, overwrite=overwrite)
    out = Path(out)
    meta = {str(k): str(v) for k, v in adapter.metadata.items()}
    groups = components(adapter)
    if "" in groups and len(groups) > 1:
        raise ConfigError(f"{adapter.path}: mixes pipeline components {sorted(g for g in groups if g)} with other "
                          "modules; cannot tell which model those belong to.")
    s = adapter.settings
    extra = peft_other_tensors(adapter) if adapter.format == "peft" else {}
    written = []
    for component, modules in groups.items():
        folder = out / component if component else out
        written.append(save_peft_adapter(
            folder, modules, use_rslora=s.use_rslora, base_model_name_or_path=s.base_model_name_or_path,
            task_type=s.raw.get("task_type") if adapter.format == "peft" else None,
            modules_to_save=(s.modules_to_save or None) if extra else None, extra_tensors=extra,
            metadata=meta, overwrite=overwrite))
    return written


def peft_other_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    """``modules_to_save`` copies of a PEFT source, keyed without PEFT's prefix, read from their file."""
    files = {o.file for o in adapter.other_tensors if o.file is not None}
    out: dict[str, torch.Tensor] = {}
    for f in sorted(files):
        store = open_tensor_file(f)
        out.update({strip_peft_prefix(k): store.get(k, validate=False) for k in store.names()
                    if parse_peft_key(k).role == "other"})
    return out
