"""The minimal bundled trainer: LoRA, CoRA (frozen-B / init-B), CondLoRA, LoRA-SP, Chain of LoRA, head-only;
tasks ``lm`` (next token) and ``classify`` (sequence classification, :mod:`.tasks`).

``train(base, method, ...)`` loads a model (any ``nn.Module`` or a Hugging Face
folder), injects adapter layers, runs one AdamW loop and writes a PEFT adapter.
Modules: :mod:`.layers` (adapter layers), :mod:`.inject`, :mod:`.setup`
(per-method starting values), :mod:`.inits` (init folders and stand-ins),
:mod:`.masks` (LoRA-SP), :mod:`.tasks` (lm, classify: batches, loss, metrics),
:mod:`.data` (token blocks), :mod:`.labelled` (labelled examples),
:mod:`.models` and :mod:`.heads` (loading; the head a task trains in full),
:mod:`.memory` (peak memory), :mod:`.loop` (the one loop), :mod:`.export`,
:mod:`.api`. See docs/training.md.
"""

from .api import prepare, train
from .config import METHODS, TASKS, TrainConfig
from .loop import Run, TrainResult, fit
from .masks import SparseSettings

__all__ = ["METHODS", "TASKS", "Run", "SparseSettings", "TrainConfig", "TrainResult", "fit", "prepare", "train"]
