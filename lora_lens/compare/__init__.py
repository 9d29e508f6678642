"""Compare stage: subspace similarity, alignment with W0, intruder dimensions.

Runs after :mod:`lora_lens.decompose` and imports only it, ``io``, ``linalg``,
``keys`` and ``types``. Results are frozen dataclasses with ``to_dict()``
(JSON-ready, layer order).

- :func:`layer_similarity`: layers × layers φ grids per module type (LoRA §7).
- :func:`adapter_similarity`, :func:`pairwise_similarity`: adapter × adapter per module.
- One φ per pair (docs/maths.md §2): the pair's own ranks and an explicit side (``out``, the default,
  ``in`` or ``both``), the same in similarity, collections and the report.
- :func:`alignment`: LoRA §7.3 projection norms and amplification.
- :func:`intruder_dimensions`: Shuttleworth et al. 2024.
- :func:`analyze_alignment`: both of the last two in one pass over the base.
- :func:`collection_similarity`, :func:`collection_structure`: many adapters at once (N × N φ, clusters,
  shared basis).
"""

from .alignment import Alignment, ModuleAlignment, alignment
from .alignment_pass import AlignmentAnalysis, analyze_alignment
from .baselines import PairBaseline, expected_phi_grid, layer_baseline, pair_baseline
from .collection import CollectionSettings, CollectionSimilarity, collection_similarity
from .collection_structure import collection_structure
from .intruders import Intruders, ModuleIntruders, intruder_dimensions, max_cosines
from .pairing import pair_with_base
from .similarity import (
    AdapterSimilarity, LayerGrid, LayerSimilarity, ModulePairSimilarity, adapter_similarity, layer_similarity,
    pairwise_similarity,
)
from .subspaces import SIDE_WHY, SIDES, Subspace, adapter_subspaces, side_note

__all__ = [
    "SIDES", "SIDE_WHY", "side_note", "AdapterSimilarity", "Alignment", "AlignmentAnalysis", "CollectionSettings", "CollectionSimilarity", "Intruders", "LayerGrid", "LayerSimilarity",
    "ModuleAlignment", "ModuleIntruders", "ModulePairSimilarity", "PairBaseline", "Subspace", "adapter_similarity",
    "adapter_subspaces", "alignment", "analyze_alignment", "collection_similarity", "collection_structure",
    "expected_phi_grid", "intruder_dimensions",
    "layer_baseline", "layer_similarity", "max_cosines", "pair_baseline", "pair_with_base", "pairwise_similarity",
]
