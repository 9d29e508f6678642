"""lora_lens init folders: what ``cora init`` / ``condlora init`` / ``pissa`` write and ``train --init`` reads.

Every init folder holds ``lora_lens_init.json`` (an :class:`InitDescription`)
and, where the method fits PEFT's format, a PEFT adapter folder:

CoRA (``method="cora"``)::

    OUT/lora_lens_init.json           mode "frozen" | "init"; frozen ["lora_B"] or []
    OUT/adapter_config.json           PEFT: lora_B = the common basis, lora_A = 0
    OUT/adapter_model.safetensors

CondLoRA (``method="condlora"``)::

    OUT/lora_lens_init.json           mode "auto" | "official" | "general" (params.modes: per module type); targets
    OUT/condlora_theta.safetensors    "<module type>.theta_A", "<module type>.theta_B"
    OUT/peft/…                        the per-layer A, B that Θ gives, as a PEFT adapter

Θ shapes: official (square W0 ``(n, n)``): ``theta_A (r, n)``, ``theta_B (r, n)``,
``A = Θ_A W0ᵀ``, ``B = W0 Θ_Bᵀ``. General: ``theta_A (m, r)``, ``theta_B (n, r)``,
``A = Θ_Aᵀ W0``, ``B = W0 Θ_B`` (docs/maths.md §5).

PiSSA (``method="pissa"``): a PEFT adapter at OUT plus ``OUT/residual_model.safetensors``,
the base weights with ``W0 − s·B A`` in place of each target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import __version__
from ..errors import CheckpointError, ConfigError
from .atomic import atomic_write_json, register_input
from .jsonfile import read_json

INIT_NAME = "lora_lens_init.json"
THETA_NAME = "condlora_theta.safetensors"
METHODS = ("cora", "condlora", "pissa", "lora")


@dataclass(frozen=True)
class InitDescription:
    """The JSON beside an init file.

    ``targets``: module types (``self_attn.q_proj``) the init covers;
    ``frozen``: which factors the trainer must keep fixed (``["lora_B"]`` for
    CoRA frozen-B); ``peft_adapter``: the PEFT folder relative to the init
    folder (``"."`` or ``"peft"``), or None; ``params``: the method's options;
    ``sources``: input paths, for provenance.
    """

    method: str
    rank: int
    alpha: float
    targets: list[str]
    mode: str | None = None
    frozen: list[str] = field(default_factory=list)
    peft_adapter: str | None = "."
    theta_file: str | None = None
    params: dict = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    lora_lens_version: str = __version__

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"init method {self.method!r} is unknown; expected one of {list(METHODS)}.")
        if self.rank <= 0:
            raise ConfigError(f"init rank must be positive; got {self.rank}.")


def write_init_description(folder: str | Path, desc: InitDescription) -> Path:
    return atomic_write_json(Path(folder) / INIT_NAME, asdict(desc))


def read_init_description(folder: str | Path) -> InitDescription:
    """Read ``lora_lens_init.json`` from an init folder, validating its fields."""
    path = Path(folder) / INIT_NAME
    register_input(folder)
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: no {INIT_NAME}; expected an init folder written by 'lora-lens cora init' or "
            "'lora-lens condlora init'."
        )
    raw = read_json(path, "an init description written by lora-lens")
    try:
        return InitDescription(**raw)
    except TypeError as e:
        raise ConfigError(f"{path}: unexpected fields ({e}); re-create it with this lora_lens version.") from None
