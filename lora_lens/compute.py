"""The run-wide compute settings, resolved once and passed down as one value.

A :class:`Compute` holds where and how the linear algebra runs: the device,
the compute dtype, the memory budget of one chunk, the seed every random draw
derives from, and a progress callback. It is built once at the edge (the CLI,
or the first public call of a notebook) — ``device="auto"`` is turned into a
``torch.device`` and ``"float32"`` into ``torch.float32`` here and nowhere
else — and handed to every stage unchanged (torchtune's "resolve once" recipes,
mergekit's ``MergeOptions``).

Public functions take ``compute=Compute(...)``; for convenience they also
accept the fields as keywords (``device="cpu", max_memory=2 << 30``), which
:func:`as_compute` folds into one ``Compute`` at that call.

Random draws are seeded **per item** (:func:`item_seed`): a stable hash of the
item's name (a module or weight name) mixed with ``Compute.seed``. So the same
inputs give the same draws, and on one thread count the same numbers, whatever ``max_memory`` (how
items are chunked) or the order in which items reach the device; another thread count changes only
the products' rounding (BLAS splits them differently), never a draw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields, replace
from typing import Callable

import torch

from .errors import ConfigError

#: ``progress(done, total, what)``, called after each chunk.
Progress = Callable[[int, int, str], None]

#: Compute dtypes by name (inputs in bf16/fp16 are upcast to one of these).
DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: Default device budget (bytes) of one chunk: a 7B model's 32 stacked
#: 4096×11008 weights and their full SVDs would need ~50 GB at once, so a shape
#: group is cut into chunks of at most this much. ``None`` lifts the cap.
DEFAULT_MAX_MEMORY = 4 << 30


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is refused."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available; use --device cpu or auto.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}; expected auto, cpu or cuda[:N].") from None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the ``torch.dtype`` itself) → ``torch.dtype``; anything else refused."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"compute dtype {dtype} is not supported; expected one of {list(DTYPES)}.")
        return dtype
    try:
        return DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unknown compute dtype {dtype!r}; expected one of {list(DTYPES)}.") from None


@dataclass(frozen=True)
class Compute:
    """Run-wide compute settings; strings are resolved on construction, once.

    ``device``: ``auto`` (CUDA when present), ``cpu``, ``cuda[:N]`` or a
    ``torch.device``; ``dtype``: ``float32`` (default) or ``float64``;
    ``max_memory``: bytes one chunk may use on the device (``None``: one whole
    shape group per call); ``seed``: the root of every random draw (per item,
    see :func:`item_seed`); ``progress``: ``progress(done, total, what)``;
    ``half_passes``: whether the range finder runs the passes no check reads
    on bf16 weights as stored (``None``: where that is fast, see
    :func:`lora_lens.randomized.half_passes_apply`; never with float64).
    """

    device: torch.device | str = "auto"
    dtype: torch.dtype | str = torch.float32
    max_memory: int | None = DEFAULT_MAX_MEMORY
    seed: int = 0
    progress: Progress | None = None
    half_passes: bool | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype))
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory <= 0):
            raise ConfigError(f"max_memory={self.max_memory!r}; expected a positive number of bytes or None.")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed={self.seed!r}; expected an integer.")

    @property
    def itemsize(self) -> int:
        """Bytes per element of the compute dtype."""
        return torch.finfo(self.dtype).bits // 8

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def seed_for(self, name: str) -> int:
        """The seed of the item called ``name`` (see :func:`item_seed`)."""
        return item_seed(self.seed, name)

    def seeds_for(self, names) -> list[int]:
        return [item_seed(self.seed, n) for n in names]

    def report(self, done: int, total: int, what: str) -> None:
        """Forward to ``progress`` when there is one."""
        if self.progress is not None:
            self.progress(done, total, what)


_FIELDS = tuple(f.name for f in fields(Compute))
_NONE_IS_A_VALUE = ("max_memory", "progress")


def as_compute(compute: Compute | None = None, **options) -> Compute:
    """One :class:`Compute` from ``compute`` and/or its fields given as keywords (given ones win).

    ``max_memory=None`` and ``progress=None`` are values (no cap, no
    progress); ``device``, ``dtype`` or ``seed`` given as ``None`` mean "keep".
    Unknown keywords raise ``TypeError``, as a misspelt argument would.
    """
    bad = [k for k in options if k not in _FIELDS]
    if bad:
        raise TypeError(f"unexpected keyword argument(s) {bad}; compute options are {list(_FIELDS)}.")
    given = {k: v for k, v in options.items() if v is not None or k in _NONE_IS_A_VALUE}
    if compute is None:
        return Compute(**given)
    if not isinstance(compute, Compute):
        raise TypeError(f"compute must be a lora_lens.Compute, not {type(compute).__name__}.")
    return replace(compute, **given) if given else compute


def item_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one named item: BLAKE2b of ``"<seed>:<name>"``.

    Stable across processes, platforms and Python versions (unlike ``hash``),
    and independent of how items are grouped, ordered or chunked (docs/maths.md §10).
    """
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
