"""Init methods and their analyses, one module per paper (docs/maths.md §5, §6, §9).

- :mod:`.condlora`: CondLoRA's shared-``Θ`` parameterization (:func:`condlora_factors`) and ``Θ`` init files;
  :mod:`.condlora_analysis`: its conversion-matrix analysis.
- :mod:`.cora`: CoRA common-subspace bases and frozen-B / init-B init files.
- :mod:`.pissa`: PiSSA init (principal factors + residual base).
- :mod:`.reduce`: deprecated alias of :mod:`lora_lens.ops.resize` (rank reduction by truncating the SVD).

Shared by them: :mod:`.targets` (which base weights an init covers, their layout) and :mod:`.result`
(the result record and provenance an init writes). Init folders follow :mod:`lora_lens.io.initfile`.
"""

from .condlora import condlora_factors, condlora_init, condlora_theta_default
from .condlora_analysis import CondLoraAnalysis, ConversionGrid, condlora_analysis
from .cora import CoraBasis, collection_cora_init, cora_basis, cora_init, top_left_subspace, write_cora_basis
from .pissa import pissa_init
from .reduce import ReducedAdapter, rank_for_energy, reduce_rank
from .result import InitResult
from .targets import TargetLayer, target_layers

__all__ = [
    "CondLoraAnalysis", "ConversionGrid", "CoraBasis", "InitResult", "ReducedAdapter", "TargetLayer",
    "condlora_analysis", "condlora_factors", "condlora_init", "condlora_theta_default", "cora_basis", "cora_init",
    "collection_cora_init", "pissa_init", "rank_for_energy", "reduce_rank", "target_layers", "top_left_subspace",
    "write_cora_basis",
]
