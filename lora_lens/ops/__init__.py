"""Operations on adapter weights: resize, merge, extract, intruder reduction (docs/weights.md).

This stage sits after :mod:`lora_lens.compare`: each operation is a function from
factored modules (and, for extract, two lazily read checkpoints) to factored
modules, built on :mod:`lora_lens.decompose`'s factored SVD and the range finder.
One module per operation; :mod:`.rank_rules` holds the rank-selection rules they share.
"""

from .extract import Extraction, extract_lora
from .intruders import IntruderReduction, reduce_intruders
from .rank_rules import RANK_METHODS, check_rank_rule, select_rank

__all__ = ["RANK_METHODS", "check_rank_rule", "select_rank"]
__all__ += ["Extraction", "extract_lora"]
__all__ += ["IntruderReduction", "reduce_intruders"]
