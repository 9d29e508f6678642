"""The base weights an init covers: target selection, the rank they can hold, their stored layout.

Every method works in PyTorch's ``(m, n)`` layout: a GPT-2 ``Conv1D`` stores
its weight as ``(n, m)``, so it is transposed on load (:func:`target_layers`
records the layout) and back on write (:func:`stored_layout`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import ConfigError
from ..io.base import BaseWeights
from ..io.layout import is_conv1d_base, named_conv1d
from ..keys import resolve_targets
from ..types import LayerKey, LoraModule


@dataclass(frozen=True)
class TargetLayer:
    """One base weight an init covers.

    ``weight``: the tensor name in the base; ``shape``: ``(m, n)`` in PyTorch's
    layout; ``layout``: ``linear`` or ``conv1d`` (stored ``(n, m)``).
    """

    weight: str
    key: LayerKey
    shape: tuple[int, int]
    layout: str = "linear"

    @property
    def module(self) -> str:
        """The module path PEFT wraps (the weight name without ``.weight``)."""
        return self.weight.removesuffix(".weight")


def target_layers(base: BaseWeights, targets: str | Sequence[str]) -> "OrderedDict[str, list[TargetLayer]]":
    """``{module type: [TargetLayer, …] in block order}`` for the targets.

    Only 2-D weights inside numbered blocks are candidates (embeddings and
    heads are not per-layer targets). Unknown targets raise
    :class:`~lora_lens.errors.KeyMatchError` listing the module types there are.
    """
    conv1d = is_conv1d_base(base)
    groups = [g for g in base.groups() if all(base.layer_key(t.name).block is not None for t in g.tensors)]
    chosen = resolve_targets(targets, [g.module for g in groups], source=f"base checkpoint {base.path}")
    out: OrderedDict[str, list[TargetLayer]] = OrderedDict()
    for g in groups:
        if g.module not in chosen:
            continue
        layers = []
        for t in g.tensors:
            stored_nm = conv1d and named_conv1d(t.name)  # io.layout's per-module rule
            shape = (t.shape[1], t.shape[0]) if stored_nm else (t.shape[0], t.shape[1])
            layers.append(TargetLayer(t.name, base.layer_key(t.name), shape, "conv1d" if stored_nm else "linear"))
        out[g.module] = sorted(layers, key=lambda x: x.key.sort_key())
    return out


def check_rank(rank: int, layers: "dict[str, list[TargetLayer]]", limit: str = "min") -> None:
    """Refuse a rank the shapes cannot hold: ``r ≤ min(m, n)`` (``limit="min"``) or ``r ≤ m`` (``"m"``)."""
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer; got {rank!r}.")
    for mt, ls in layers.items():
        for layer in ls:
            cap = min(layer.shape) if limit == "min" else layer.shape[0]
            if rank > cap:
                raise ConfigError(
                    f"rank {rank} is larger than {layer.weight} allows ({layer.shape[0]}x{layer.shape[1]}, "
                    f"at most {cap}); choose --rank ≤ {cap}."
                )


def stored_layout(W: torch.Tensor, layout: str) -> torch.Tensor:
    """Back from ``(m, n)`` to the layout the checkpoint stores (``(n, m)`` for Conv1D)."""
    return W.T.contiguous() if layout == "conv1d" else W.contiguous()


def lora_module(layer: TargetLayer, A: torch.Tensor, B: torch.Tensor, alpha: float) -> LoraModule:
    """A LoRA pair for one target: ``A (r, n)``, ``B (m, r)``, ``s = alpha / r``."""
    r = int(A.shape[0])
    return LoraModule(layer.module, layer.key, A.contiguous(), B.contiguous(), alpha=float(alpha),
                      scaling=float(alpha) / r, layout=layer.layout)
