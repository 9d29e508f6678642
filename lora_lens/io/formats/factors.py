"""What every reader shares: 2-D factors, one module from its factors, all-at-once errors, the Adapter.

Every reader ends in the same factored form: ``ΔW = s · B A`` with
``B (m, k)``, ``A (k, n)`` in PyTorch's Linear layout (a Conv2d's kernel
flattened into ``n = in·kh·kw``). The helpers here check what every format
must satisfy (float, finite, 2-D or a 1×1/k×k conv factor, shared rank) and
name the file and tensor when it does not.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ...errors import CheckpointError, ShapeError
from ...keys import parse_module_path
from ...types import Adapter, LoraModule, LoraSettings, TensorInfo
from ..tensors import check_tensor, factor_2d

#: Flag of a module whose scale the file does not say (read as 1).
SCALE_UNKNOWN = "scale-unknown"


def scalar(t: torch.Tensor, key: str, file: Path) -> float:
    """The value of a one-element tensor (an ``alpha``); anything else is a bad file, named."""
    if t.numel() != 1:
        raise CheckpointError(f"{file}: tensor '{key}' has shape {tuple(t.shape)}; expected one number (an alpha). "
                              "The file is damaged or not this format; pass --format to choose another reader.")
    return float(t.double().reshape(-1)[0])


def lora_module(name: str, A: torch.Tensor, B: torch.Tensor, *, scaling: float, alpha: float, file: Path,
                keys: tuple[str, str], layout: str | None = None, kind: str = "lora",
                stored_as: str = "", kernel: tuple[int, ...] = (), checked: bool = False) -> LoraModule:
    """One module ``s · B A`` from stored factors ``A (k, n)`` (or conv ``(k, in, kh, kw)``) and ``B (m, k)``.

    Both are checked (float, finite) unless ``checked`` says they are products of checked
    tensors (LoKr / LoHa); their shared dimension must agree.
    """
    if not checked:
        A = check_tensor(A, keys[0], file)
        B = check_tensor(B, keys[1], file)
    A, kernel_a = factor_2d(A, "A", keys[0], file)
    B, _ = factor_2d(B, "B", keys[1], file)
    kernel = kernel or kernel_a
    if A.shape[0] != B.shape[1]:
        raise ShapeError(
            f"{file}: '{stored_as or name}' has factors {keys[0]} {tuple(A.shape)} and {keys[1]} {tuple(B.shape)}; "
            "expected A (r, n) and B (m, r) with the same r. The file is corrupt or was not written as a LoRA."
        )
    layout = layout or ("conv" if kernel else "linear")
    return LoraModule(name=name, key=parse_module_path(name), A=A, B=B, alpha=float(alpha), scaling=float(scaling),
                      layout=layout, kind=kind, stored_as=stored_as if stored_as != name else "", kernel=kernel)


def refuse_orphans(file: Path, orphans: Sequence[str], what: str = "both factors") -> None:
    """One error naming every module that lacks a factor (``orphans``: one line each)."""
    if orphans:
        shown = "; ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
        raise CheckpointError(f"{file}: {shown}; every module needs {what}. The file is incomplete: re-save it.")


def refuse_empty(file: Path, modules: Sequence[LoraModule], expected: str) -> None:
    if not modules:
        raise CheckpointError(f"{file}: holds no low-rank factors ({expected}); it is not an adapter of this format. "
                              "Pass --format NAME to choose another reader (see docs/formats.md).")


def settings_of(modules: Sequence[LoraModule], peft_type: str = "LORA", raw: dict | None = None) -> LoraSettings:
    """A :class:`LoraSettings` summing up modules read from a format without a PEFT config:
    the most common rank and alpha, the others as ``rank_pattern`` / ``alpha_pattern``."""
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    r0 = ranks.most_common(1)[0][0] if ranks else 0
    a0 = alphas.most_common(1)[0][0] if alphas else 0.0
    return LoraSettings(
        r=r0, lora_alpha=a0,
        rank_pattern={m.name: m.rank for m in modules if m.rank != r0},
        alpha_pattern={m.name: m.alpha for m in modules if m.alpha != a0},
        peft_type=peft_type, raw=dict(raw or {}),
    )


def make_adapter(path: Path, modules: Iterable[LoraModule], *, format: str, weights_file: Path,
                 others: Sequence[TensorInfo] = (), flags: Sequence[str] = (), exact: bool = True,
                 settings: LoraSettings | None = None, metadata: dict | None = None,
                 peft_type: str = "LORA", scale_unknown: Sequence[str] = ()) -> Adapter:
    """The :class:`Adapter` every reader returns, modules in network order.

    ``scale_unknown`` names the modules whose scale the file does not give (read as 1); they get one flag.
    """
    modules = sorted(modules, key=lambda m: m.key.sort_key())
    unknown = list(scale_unknown)
    flags = list(flags)
    if unknown:
        flags.append(f"{SCALE_UNKNOWN}: the file does not say the scale of {len(unknown)} module(s); read as s = 1, "
                     "so norms are relative (subspaces, φ and effective ranks are unaffected).")
    return Adapter(
        path=path, settings=settings or settings_of(modules, peft_type), modules=tuple(modules),
        other_tensors=tuple(others), flags=tuple(flags), delta_is_sBA=exact, weights_file=weights_file,
        format=format, metadata=dict(metadata or {}),
    )
