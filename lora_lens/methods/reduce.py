"""Deprecated: rank reduction now lives in :mod:`lora_lens.ops.resize` (``lora-lens resize``).

:func:`reduce_rank` and ``lora-lens reduce`` stay as thin aliases of
:func:`~lora_lens.ops.resize.resize` (``energy=F`` is ``method="energy",
param=F``) whose JSON keeps the kind ``reduced_adapter``. Since the move the
scale of each module is kept (``alpha = s·k``) instead of set to 1, and every
format we read is accepted, not only PEFT folders.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from ..compute import Compute
from ..errors import ConfigError
from ..ops.output import WrittenResult  # the deprecated alias shares resize's result fields
from ..spectra import rank_at_energy
from ..types import Adapter


@dataclass(frozen=True)
class ReducedAdapter(WrittenResult):
    """What :func:`reduce_rank` wrote: the fields of :class:`~lora_lens.ops.resize.ResizeResult`, kind ``reduced_adapter``."""

    KIND = "reduced_adapter"


def rank_for_energy(S: torch.Tensor, energy: float) -> int:
    """The rank kept for ``energy``: :func:`lora_lens.spectra.rank_at_energy`, but at least 1.

    A zero update has energy rank 0 (one definition, in ``spectra``); a module needs
    ``r ≥ 1``, so it is written as one zero pair.
    """
    return max(1, int(rank_at_energy(S, energy)))


def reduce_rank(
    adapter: Adapter | str | Path,
    rank: int | None = None,
    energy: float | None = None,
    *,
    out_dir: str | Path,
    overwrite: bool = False,
    compute: Compute | None = None,
    method: str | None = None,
    param: float | None = None,
    **options,
) -> ReducedAdapter:
    """Deprecated alias of :func:`lora_lens.ops.resize.resize` (``energy=F``: ``method="energy", param=F``)."""
    from ..ops.resize import resize

    if energy is not None:
        if method is not None or rank is not None:
            raise ConfigError("give exactly one of --rank R, --energy F or --method M --param P.")
        method, param = "energy", energy
    res = resize(adapter, out_dir, rank=rank, method=method, param=param, overwrite=overwrite, compute=compute,
                 **options)
    return ReducedAdapter(**{f.name: getattr(res, f.name) for f in fields(res)})
