"""Adapter layers: a frozen Linear / GPT-2 Conv1D plus a trainable low-rank update.

Legend: ``m`` out features, ``n`` in features, ``r`` rank. ``W0`` is always
meant in PyTorch's Linear layout ``(m, n)``; a GPT-2 ``Conv1D`` stores it as
``(n, m)`` and computes ``y = x W + b`` with that stored ``W``. Both layers
wrap the base module (kept as ``base_layer``, like PEFT) and leave it frozen.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..methods.condlora import condlora_factors


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``, recognised without importing transformers."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def base_shape(module: nn.Module) -> tuple[int, int]:
    """``(m, n)`` of a Linear or Conv1D in PyTorch's layout."""
    n0, n1 = module.weight.shape
    return (n1, n0) if is_conv1d(module) else (n0, n1)


def base_weight(module: nn.Module) -> torch.Tensor:
    """``W0 (m, n)``: the module's weight in PyTorch's layout (a view; no copy)."""
    return module.weight.T if is_conv1d(module) else module.weight


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator | None = None, **like) -> torch.Tensor:
    """PEFT's init of ``lora_A``: ``kaiming_uniform_(A, a=√5)`` on an ``(rows, cols)`` matrix.

    With ``a = √5`` the gain is ``√(2 / (1 + a²)) = √(1/3)``, so the bound is
    ``gain · √(3 / fan_in) = 1 / √cols``: ``U(-1/√cols, 1/√cols)``.
    """
    bound = 1.0 / math.sqrt(cols)
    return torch.empty(rows, cols, **like).uniform_(-bound, bound, generator=generator)


def merge_into_base(module: nn.Module, delta: torch.Tensor) -> None:
    """``W0 ← W0 + ΔW`` in place, with ``ΔW (m, n)`` transposed for a Conv1D's stored layout."""
    with torch.no_grad():
        module.weight.add_(delta.T if is_conv1d(module) else delta)


class LoRALinear(nn.Module):
    """LoRA around a frozen Linear or Conv1D (Hu et al. 2021).

    ``y = base(x) + s · (x Aᵀ) Bᵀ`` with ``A (r, n)``, ``B (m, r)`` and
    ``s = alpha / r``, so ``ΔW = s · B A``. The update is the same whatever the
    base stores: it never touches ``W0``, only :meth:`merge_` does.

    Init (:meth:`reset`): ``B = 0`` and ``A`` Kaiming-uniform with ``a = √5``,
    exactly PEFT's default, so the layer starts as the base. CoRA sets ``B``
    from a basis and ``A = 0`` (:meth:`set_factors`) and may freeze ``B``;
    Chain of LoRA calls :meth:`merge_` then :meth:`reset` at every knot.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        m, n = base_shape(base_layer)
        w = base_layer.weight
        self.base_layer = base_layer
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        self.lora_A = nn.Parameter(torch.zeros(rank, n, dtype=w.dtype, device=w.device))  # (r, n)
        self.lora_B = nn.Parameter(torch.zeros(m, rank, dtype=w.dtype, device=w.device))  # (m, r)

    @property
    def layout(self) -> str:
        return "conv1d" if is_conv1d(self.base_layer) else "linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, n), B (m, r))`` as used in the forward."""
        return self.lora_A, self.lora_B

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """A fresh LoRA link: ``A`` Kaiming-uniform (a=√5), ``B = 0``."""
        A = self.lora_A
        A.copy_(kaiming_uniform(*A.shape, generator=generator, dtype=torch.float32).to(A))
        self.lora_B.zero_()

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)

    @torch.no_grad()
    def merge_(self) -> None:
        """``W0 ← W0 + s · B A`` (in the base's stored layout)."""
        merge_into_base(self.base_layer, self.scaling * (self.lora_B @ self.lora_A))


class CondTheta(nn.Module):
    """CondLoRA's shared pair for one module type (Kim et al. 2024; docs/maths.md §5).

    ``official`` (square ``W0 (n, n)``): ``theta_A (r, n)``, ``theta_B (r, n)``.
    ``general`` (any ``(m, n)``): ``theta_A (m, r)``, ``theta_B (n, r)``.
    Created at zero; the trainer fills it from an init folder or from
    :func:`~lora_lens.methods.condlora.condlora_theta_default` (Kaiming ``Θ_A``, zero ``Θ_B``).
    """

    def __init__(self, m: int, n: int, rank: int, mode: str, dtype=torch.float32, device=None):
        super().__init__()
        self.mode, self.rank, self.shape = mode, rank, (m, n)
        a_shape, b_shape = ((rank, n), (rank, n)) if mode == "official" else ((m, rank), (n, rank))
        self.theta_A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=device))
        self.theta_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))

    @torch.no_grad()
    def set_(self, theta_A: torch.Tensor, theta_B: torch.Tensor) -> None:
        self.theta_A.copy_(theta_A)
        self.theta_B.copy_(theta_B)

    def factors(self, W0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, n), B (m, r))`` for one layer's ``W0 (m, n)``.

        official: ``A = Θ_A W0ᵀ``, ``B = W0 Θ_Bᵀ``; general: ``A = Θ_Aᵀ W0``, ``B = W0 Θ_B``.
        """
        return condlora_factors(self.theta_A, self.theta_B, W0, self.mode)


class CondLoRALinear(nn.Module):
    """CondLoRA around a frozen Linear or Conv1D: ``A`` and ``B`` come from ``W0``.

    ``y = base(x) + s · (x Aᵀ) Bᵀ`` with ``(A, B) = theta.factors(W0)``
    recomputed at every forward from this layer's frozen ``W0 (m, n)``; the
    only trainable tensors are the shared ``theta`` (one per module type), so
    gradients of every layer of a type add up in the same ``Θ``.
    """

    def __init__(self, base_layer: nn.Module, theta: CondTheta, alpha: float):
        super().__init__()
        self.base_layer = base_layer
        self.theta = theta
        self.rank, self.alpha, self.scaling = theta.rank, float(alpha), alpha / theta.rank

    @property
    def layout(self) -> str:
        return "conv1d" if is_conv1d(self.base_layer) else "linear"

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.theta.factors(base_weight(self.base_layer))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()  # (r, n), (m, r)
        return self.base_layer(x) + self.scaling * F.linear(F.linear(x, A), B)
