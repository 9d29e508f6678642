"""What the init methods share: target layers of a base, its Conv1D layout, a
stacked least-squares solver, provenance and the result record.

Every method works in PyTorch's ``(m, n)`` layout: a GPT-2 ``Conv1D`` stores
its weight as ``(n, m)``, so it is transposed on load (and back on write).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .. import __version__
from ..errors import ConfigError
from ..io.base import BaseWeights
from ..io.initfile import InitDescription
from ..io.layout import is_conv1d_base, named_conv1d
from ..jsonable import stamp, to_jsonable
from ..keys import resolve_targets
from ..linalg import lstsq
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


def stacked_lstsq(
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], rcond: float | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Least squares over stacked blocks: ``[M_1; …; M_L] X ≈ [Y_1; …; Y_L]``.

    ``M_l (p, q)``, ``Y_l (p, k)`` → ``X (q, k)`` (minimum norm when the stack
    is rank-deficient). Streams: a running thin QR ``[R; M_l] = Q' R'`` keeps
    only ``R (≤q, q)`` and ``Qᵀ Y (≤q, k)``, so memory is one block plus
    ``q²``, never the ``(L·p, q)`` stack; the small final system goes to
    :func:`~lora_lens.linalg.lstsq`. Since the running ``Q`` has orthonormal
    columns, ``R X = Qᵀ Y`` has the same least-squares / minimum-norm solution
    as the stack.
    """
    R = QtY = None
    for M, Y in blocks:
        M, Y = M.to(dtype), Y.to(dtype)
        if R is not None:
            M, Y = torch.cat([R, M]), torch.cat([QtY, Y])  # (≤q + p, q), (≤q + p, k)
        Q, R = torch.linalg.qr(M)  # (rows, ≤q), (≤q, q)
        QtY = Q.T @ Y  # (≤q, k)
    if R is None:
        raise ConfigError("least squares over no layers: nothing to fit.")
    X, _ = lstsq(R, QtY, rcond=rcond)
    return X


def provenance(method: str, params: dict, sources: Sequence[str | Path]) -> dict[str, str]:
    """Safetensors metadata for an init file: method, params, sources, version."""
    return {
        "method": method,
        "params": json.dumps(params, sort_keys=True, default=str),
        "sources": json.dumps([str(s) for s in sources]),
        "lora_lens_version": __version__,
    }


def lora_module(layer: TargetLayer, A: torch.Tensor, B: torch.Tensor, alpha: float) -> LoraModule:
    """A LoRA pair for one target: ``A (r, n)``, ``B (m, r)``, ``s = alpha / r``."""
    r = int(A.shape[0])
    return LoraModule(layer.module, layer.key, A.contiguous(), B.contiguous(), alpha=float(alpha),
                      scaling=float(alpha) / r, layout=layer.layout)


@dataclass(frozen=True)
class InitResult:
    """What an init wrote: the folder, its description, and one record per module (type)."""

    out_dir: Path
    description: InitDescription
    records: tuple[dict, ...] = ()
    summary: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        # reshaped: the description is written under the name of the file it mirrors ("init")
        return stamp("init", {"out_dir": str(self.out_dir), "init": to_jsonable(self.description),
                              "summary": self.summary, "records": list(self.records)})
