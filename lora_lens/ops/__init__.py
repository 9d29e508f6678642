"""Operations on adapter weights: resize, merge, extract, intruder reduction (docs/weights.md).

This stage sits after :mod:`lora_lens.compare`: each operation is a function from
factored modules (and, for extract, two lazily read checkpoints) to factored
modules, built on :mod:`lora_lens.decompose`'s factored SVD and the range finder.
One module per operation; :mod:`.rank_rules` holds the rank-selection rules they share,
:mod:`.output` the one place their results are written.
"""

from .extract import Extraction, extract_lora
from .intruders import IntruderReduction, reduce_intruders
from .merge import MERGE_METHODS, MergeResult, Merged, merge, merge_adapters
from .rank_rules import RANK_METHODS, check_rank_rule, select_rank
from .resize import ResizeResult, Resized, resize, resize_adapter

__all__ = ["Extraction", "IntruderReduction", "MERGE_METHODS", "MergeResult", "Merged", "RANK_METHODS", "ResizeResult",
           "Resized", "check_rank_rule", "extract_lora", "merge", "merge_adapters", "reduce_intruders", "resize",
           "resize_adapter", "select_rank"]
