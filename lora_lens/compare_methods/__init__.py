"""``compare-methods``: train every method × seed at one budget on one base and data set, and judge the papers'
claims from the numbers. An orchestration above :mod:`lora_lens.train` and :mod:`lora_lens.compare` (like
:mod:`lora_lens.demo`): :mod:`.run` trains and summarises into :mod:`.results`, :mod:`.claims` judges, :mod:`.analyses` looks at
the adapters, :mod:`.output` writes results.json, results.md and the plots."""

from .claims import CLAIMS, Verdict, evaluate_claims
from .output import RESULTS_MD
from .results import Comparison, MethodSummary
from .run import compare_methods

__all__ = ["CLAIMS", "RESULTS_MD", "Comparison", "MethodSummary", "Verdict", "compare_methods", "evaluate_claims"]
