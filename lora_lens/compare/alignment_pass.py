"""Alignment with W0 and intruder dimensions in one pass over the base (what ``lora-lens alignment`` runs).

Each chunk of same-shaped base weights is read once and goes through one
batched SVD of ``[W0; W0 + ΔW]``; W0's exact singular values from it also give
the §7.3 ceiling ``‖U0_rᵀ W0 V0_r‖_F``, so nothing is decomposed twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


from ..compute import Compute, as_compute
from ..io.base import BaseWeights
from ..io.layout import with_base_layouts
from ..jsonable import JsonFields
from ..types import Adapter
from .alignment import DRAWS, Alignment, align_chunk, zero_delta_notes
from .intruders import EPSILON, K, Intruders, check_params, intruder_bytes, intruder_chunk
from .pairing import base_chunks, pair_with_base
from .serialize import in_layer_order


@dataclass(frozen=True)
class AlignmentAnalysis(JsonFields):
    """:class:`Alignment` and :class:`Intruders` of one adapter against its base."""

    KIND = "alignment_analysis"

    alignment: Alignment
    intruders: Intruders


def analyze_alignment(
    adapter: Adapter,
    base: BaseWeights,
    *,
    intruder_k: int = K,
    epsilon: float | Sequence[float] = EPSILON,
    draws: int = DRAWS,
    compute: Compute | None = None,
    **options,
) -> AlignmentAnalysis:
    """LoRA §7.3 projection norms and intruder counts per module, from one read of each base weight."""
    eps = check_params(intruder_k, epsilon)
    cx = as_compute(compute, **options)
    adapter = with_base_layouts(adapter, base)  # Linear vs Conv1D per module, as PEFT decides
    weights = pair_with_base(adapter, base)
    aligned, intruding = [], []
    for chunk in base_chunks(list(adapter), weights, base, cx, intruder_bytes(cx.itemsize), "alignment"):
        rows, S0 = intruder_chunk(chunk, intruder_k, eps)
        intruding += rows
        aligned += align_chunk(chunk, cx, S0, draws)
    notes = tuple(adapter.flags) + zero_delta_notes(aligned)
    return AlignmentAnalysis(
        Alignment(adapter.label, str(adapter.path), str(base.path), in_layer_order(aligned), draws, cx.seed,
                  True, notes),
        Intruders(adapter.label, str(adapter.path), str(base.path), intruder_k, eps,
                  in_layer_order(intruding), notes),
    )
