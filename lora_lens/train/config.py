"""One frozen, validated record of every training option (the flat keyword arguments of ``train``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError
from .masks import SparseSettings

METHODS = ("lora", "cora-frozen", "cora-init", "condlora", "lora-sp", "chain", "head-only")
TASKS = ("lm", "classify")
DTYPES = ("auto", "float32", "bfloat16")

DEFAULT_RANK, DEFAULT_ALPHA = 8, 16.0
DEFAULT_LINKS = 3

#: What ``steps`` / ``lr`` / ``batch_size`` left as None mean, per task (docs/training.md, "Defaults").
#: classify: measured against a plain PEFT + transformers loop on MiniLM and the bundled tasks
#: (benchmarks/peft_classify_reference.py); the old shared 5e-3 at batch 8 left a binary sentiment task at
#: chance (eval loss 0.692 → 0.694). lm: the synthetic and stories260K runs the tests and docs use.
TASK_DEFAULTS = {
    "lm": {"steps": 40, "lr": 5e-3, "batch_size": 8},
    "classify": {"steps": 200, "lr": 2e-3, "batch_size": 16},
}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` is a CPU that multiplies bf16 natively (AVX512-BF16 or AMX tiles).

    Read from torch's CPU probes (``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported``);
    a torch without them, or an Arm CPU, reads False. Without these units bf16 products are emulated and
    autocast is slower than float32, so ``auto`` keeps float32 there.
    """
    if device.type != "cpu":
        return False
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if callable(fn) and fn():
                return True
        except RuntimeError:
            continue
    return False


def resolve_train_dtype(requested: str, device: torch.device) -> str:
    """``auto`` → ``bfloat16`` (autocast, float32 master weights) on a CPU with native bf16, else ``float32``.

    Measured on an AMD EPYC with AVX512-BF16 (MiniLM, WordNet, 300 steps of batch 16, one thread, seeds
    0 and 1): 68–70 ms a step against 142–148 ms in float32, held-out accuracy 87.9 / 87.7 % against
    87.8 / 87.9 % (docs/training.md). On CUDA ``auto`` stays float32: not measured there, and a model this
    small is bound by kernel launches, which autocast's casts add to. ``float32`` / ``bfloat16`` as given.
    """
    if requested != "auto":
        return requested
    return "bfloat16" if native_bf16(device) else "float32"


@dataclass(frozen=True)
class TrainConfig:
    """Options of one run; checked on creation.

    ``steps`` / ``lr`` / ``batch_size`` left as None take the task's
    :data:`TASK_DEFAULTS`. ``rank`` / ``alpha`` / ``targets`` left as None take the init folder's
    values, else 8 / ``setup.default_alpha`` (16; CoRA, CondLoRA: ``α = r``, as their inits) / the
    model's attention projections. ``warmup_steps``
    None is 10 % of ``steps``. Chain of LoRA: ``knots`` (step indices where a
    new link starts) or ``links`` (evenly spaced; 3 when neither is given).
    ``task``: ``lm`` (next token) or ``classify`` (:mod:`.tasks`);
    ``max_length``: classify's token limit (None: the model's positions);
    ``eval_every``: also evaluate every so many steps (None: before and after
    only); ``train_dtype``: the *training* precision, not a compute dtype:
    ``bfloat16`` runs forward and loss under ``torch.autocast`` while the
    weights, gradients and AdamW state stay float32 (master weights); ``auto``
    (the default) is bfloat16 on a CPU with native bf16 products and float32
    elsewhere, resolved with the device (:func:`resolve_train_dtype`); the CLI
    spells it ``--dtype``.
    """

    method: str = "lora"
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    steps: int | None = None  # None: TASK_DEFAULTS[task]
    lr: float | None = None
    batch_size: int | None = None
    seq_len: int = 64
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_fraction: float = 0.1
    seed: int = 0
    knots: tuple[int, ...] | None = None
    links: int | None = None
    sparse: SparseSettings = field(default_factory=SparseSettings)
    condlora_mode: str | None = None
    device: str = "auto"
    task: str = "lm"
    max_length: int | None = None
    eval_every: int | None = None
    train_dtype: str = "auto"  # resolved with the device by prepare(): the run records bfloat16 or float32
    length_bucketing: bool = True  # classify: batches of similar lengths (less padding); False: uniform draws

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; expected one of {list(METHODS)}.")
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; expected one of {list(TASKS)}.")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)  # frozen: resolved once, here
        if self.train_dtype not in DTYPES:
            raise ConfigError(f"train_dtype (--dtype) {self.train_dtype!r} is not a training precision; expected one "
                              f"of {list(DTYPES)}.")
        positive = {"steps": self.steps, "batch_size": self.batch_size, "seq_len": self.seq_len,
                    "rank": self.rank if self.rank is not None else 1, "lr": self.lr,
                    "alpha": self.alpha if self.alpha is not None else 1,
                    "max_length": self.max_length if self.max_length is not None else 1,
                    "eval_every": self.eval_every if self.eval_every is not None else 1}
        bad = [f"{k}={v}" for k, v in positive.items() if not v > 0]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: expected positive values.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay={self.weight_decay}: expected a value ≥ 0.")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction}: expected the held-out share, "
                              "0 ≤ eval_fraction < 1 (e.g. 0.1).")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"warmup_steps={self.warmup_steps}: expected 0 … steps ({self.steps}).")
        if self.targets is not None and not self.targets:
            raise ConfigError("targets is empty; name at least one module (e.g. q_proj,v_proj) or leave it unset.")
        if self.method != "chain" and (self.knots is not None or self.links is not None):
            raise ConfigError(f"--knots / --links are options of --method chain, not {self.method}.")
        if self.knots is not None and self.links is not None:
            raise ConfigError("give --knots or --links, not both.")
        if self.knots is not None:
            k = list(self.knots)
            if not k or k != sorted(set(k)) or k[0] <= 0 or k[-1] >= self.steps:
                raise ConfigError(
                    f"knots {k}: expected increasing step indices strictly between 0 and steps ({self.steps})."
                )
        if self.links is not None and not 1 <= self.links <= self.steps:
            raise ConfigError(f"links={self.links}: expected 1 … steps ({self.steps}).")
        if self.condlora_mode not in (None, "auto", "official", "general"):
            raise ConfigError(f"CondLoRA mode {self.condlora_mode!r} is unknown; expected 'auto' (official where W0 is "
                              "square, per module type), 'official' or 'general'.")

    @property
    def warmup(self) -> int:
        return round(0.1 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def chain_knots(self) -> tuple[int, ...]:
        """Knot steps of a chain: given, or ``round(j · steps / links)`` for ``j = 1 … links − 1``."""
        if self.method != "chain":
            return ()
        if self.knots is not None:
            return tuple(self.knots)
        links = self.links or DEFAULT_LINKS
        return tuple(sorted({round(j * self.steps / links) for j in range(1, links)} - {0}))

    def as_dict(self) -> dict:
        return asdict(self)
