"""Frozen values that pass between stages.

Shape legend used throughout lora_lens: ``L`` layers, ``r`` rank, ``k`` kept
directions, ``m`` out features, ``n`` in features. Layout is PyTorch's: a base
weight ``W0`` is ``(m, n)``, ``A`` is ``(r, n)``, ``B`` is ``(m, r)`` and the
update is ``ΔW = s · B A``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .precision import full_fp32

#: How a base module stores its weight relative to PyTorch's ``(m, n)``.
#: ``linear``: ``(m, n)``; ``conv1d`` (GPT-2) and ``embedding``: ``(n, m)``, so
#: the update in the stored layout is ``(s · B A)ᵀ``; ``conv``: a Conv2d whose
#: kernel is flattened into ``n = in · kh · kw``.
LAYOUTS = ("linear", "conv1d", "embedding", "conv")

#: Update parameterizations read (``LoraModule.kind``): ``lora`` s·B·A; ``lokr``
#: s·kron(W₁, W₂); ``loha`` s·(B₁A₁)⊙(B₂A₂); ``adalora`` s·P·diag(E)·Q.
KINDS = ("lora", "lokr", "loha", "adalora")


@dataclass(frozen=True, order=True)
class LayerKey:
    """Where a module sits: ``prefix.<block>.module``.

    ``model.layers.3.self_attn.q_proj`` → ``LayerKey(prefix="model.layers",
    block=3, module="self_attn.q_proj")``. A path with no block index keeps
    ``block=None`` and its whole path as ``module``.
    """

    prefix: str
    block: int | None
    module: str
    #: The block's own path where ``block`` is a position code rather than an index
    #: (diffusion UNets: ``unet.up_blocks.1.attentions.0.transformer_blocks.0``).
    block_name: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        if self.block is None:
            return self.module
        return f"{self.prefix}.{self.block}.{self.module}" if self.prefix else f"{self.block}.{self.module}"

    def sort_key(self) -> tuple:
        return (self.prefix, -1 if self.block is None else self.block, self.module)


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, shape and dtype, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)


def dtype_size(dtype: str) -> int:
    """Bytes per element for a dtype name as safetensors or torch spell it."""
    name = dtype.replace("torch.", "").lower()
    table = {
        "f64": 8, "float64": 8, "i64": 8, "int64": 8, "u64": 8, "uint64": 8, "complex64": 8,
        "f32": 4, "float32": 4, "i32": 4, "int32": 4, "u32": 4, "uint32": 4,
        "f16": 2, "float16": 2, "bf16": 2, "bfloat16": 2, "i16": 2, "int16": 2, "u16": 2, "uint16": 2,
        "i8": 1, "int8": 1, "u8": 1, "uint8": 1, "bool": 1, "f8_e4m3": 1, "f8_e5m2": 1,
        "float8_e4m3fn": 1, "float8_e5m2": 1,
    }
    return table.get(name, 4)


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One LoRA pair: ``ΔW = scaling · B A`` with ``A (r, n)`` and ``B (m, r)``.

    ``A`` and ``B`` keep the dtype they were stored in; upcast before linear
    algebra. ``layout`` says how the *base* weight is stored, so the update in
    that layout is ``ΔW`` (``linear``) or ``ΔWᵀ`` (``conv1d``, ``embedding``).
    """

    name: str
    key: LayerKey
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    scaling: float
    layout: str = "linear"
    #: How the file parameterizes the update (``KINDS``); every kind is held here in the
    #: factored form ``s·B·A``, so ``rank`` is the effective rank (r₁·r₂ for LoKr / LoHa).
    kind: str = "lora"
    #: The module's name as the file writes it, when ``name`` was mapped to a model path.
    stored_as: str = ""
    #: ``(kh, kw)`` of a Conv2d update whose ``A`` was flattened from ``(r, in, kh, kw)``; ``()`` otherwise.
    kernel: tuple[int, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of ΔW in PyTorch's Linear layout."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    @property
    def base_shape(self) -> tuple[int, int]:
        """Shape of the base weight as stored (transposed for Conv1D / Embedding)."""
        m, n = self.shape
        return (n, m) if self.layout in ("conv1d", "embedding") else (m, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def num_parameters(self) -> int:
        return self.A.numel() + self.B.numel()

    @property
    def num_bytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()

    @full_fp32
    def delta(self, dtype: torch.dtype = torch.float64, base_layout: bool = False) -> torch.Tensor:
        """Materialize ``ΔW (m, n)``; only for tests, merges and small matrices.

        With ``base_layout=True`` the result is in the stored layout of the base
        weight (``ΔWᵀ`` for Conv1D / Embedding).
        """
        d = self.scaling * (self.B.to(dtype) @ self.A.to(dtype))
        return d.T if base_layout and self.layout in ("conv1d", "embedding") else d


@dataclass(frozen=True)
class LoraSettings:
    """The parts of a PEFT ``LoraConfig`` that decide the update's maths.

    ``raw`` keeps the whole JSON so nothing a user wrote is lost on a round trip.
    """

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: Any = None
    modules_to_save: tuple[str, ...] = ()
    use_dora: bool = False
    init_lora_weights: Any = True
    base_model_name_or_path: str | None = None
    peft_type: str = "LORA"
    raw: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class Adapter:
    """A loaded LoRA adapter: its pairs, the tensors that are not pairs, and flags.

    ``flags`` holds plain-language warnings about things that change how the
    update should be read (DoRA, a base rewritten by PiSSA/OLoRA, LoRA biases).
    ``delta_is_sBA`` is False when ``ΔW = s·B·A`` against the *original* base
    does not describe what the adapter does.
    """

    path: Path
    settings: LoraSettings
    modules: tuple[LoraModule, ...]
    other_tensors: tuple[TensorInfo, ...] = ()
    flags: tuple[str, ...] = ()
    delta_is_sBA: bool = True
    adapter_name: str | None = None
    weights_file: Path | None = None
    #: Which reader produced it (``peft``, ``mlx``, ``kohya``, ``lycoris``, ``diffusers``, ``state_dict`` …).
    format: str = "peft"
    #: Text metadata of the file worth showing (kohya's ``ss_*`` training settings, …).
    metadata: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.modules})

    def __getitem__(self, name: str) -> LoraModule:
        return self._by_name[name]  # type: ignore[attr-defined]

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def module_types(self) -> list[str]:
        """Distinct module types in first-seen order (``self_attn.q_proj``, …)."""
        return list(dict.fromkeys(m.key.module for m in self.modules))

    @property
    def num_parameters(self) -> int:
        return sum(m.num_parameters for m in self.modules)

    @property
    def num_bytes(self) -> int:
        return sum(m.num_bytes for m in self.modules)

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        return self.adapter_name or self.path.name
