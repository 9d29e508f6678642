"""LoRA-SP (Wu et al. 2024; docs/maths.md §8): update only a random half of the LoRA parameters.

A seeded Bernoulli(0.5) mask per factor says which entries may change. It is
applied to the *update*, not to the weights, in two places, so that nothing
an optimizer does can move a frozen entry:

1. :meth:`UpdateMasks.mask_grads` zeroes the gradient of frozen entries
   (before clipping, so the gradient norm counts trainable entries only);
2. the optimizer, :class:`~lora_lens.train.masked_adamw.MaskedAdamW`, reads the
   masks (:meth:`UpdateMasks.mask_of`) and leaves a frozen entry, its moments
   and its step count untouched (no weight decay, no step from old moments).
   Its bias correction counts each entry's own trainable steps, so an entry that
   a re-sample unfreezes takes Adam's step (≤ lr on a fresh entry), not the
   2.5–3× lr a running global step count with zeroed moments gave.

Granularity: ``element`` (one coin per entry), ``row`` (one per row of the
factor: a rank component of ``A (r, n)``, an output feature of ``B (m, r)``),
``column`` (one per column). Re-sample: ``never``, every ``epoch`` or every
``step``; draw ``k`` uses the generator seeded with ``seed + k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError

GRANULARITIES = ("element", "row", "column")
MASK_TARGETS = ("A", "B", "both")
RESAMPLE = ("never", "epoch", "step")


@dataclass(frozen=True)
class SparseSettings:
    granularity: str = "element"
    targets: str = "both"
    resample: str = "never"
    keep: float = 0.5

    def __post_init__(self):
        for value, allowed, what in ((self.granularity, GRANULARITIES, "granularity"),
                                     (self.targets, MASK_TARGETS, "targets"), (self.resample, RESAMPLE, "re-sample")):
            if value not in allowed:
                raise ConfigError(f"LoRA-SP {what} {value!r} is unknown; expected one of {list(allowed)}.")
        if not 0.0 < self.keep <= 1.0:
            raise ConfigError(f"LoRA-SP keep fraction must be in (0, 1]; got {self.keep}.")


class UpdateMasks:
    """Masks over the update of some parameters (``True`` = trainable entry).

    ``params``: ``{name: parameter}`` with names ending in ``lora_A`` /
    ``lora_B``; those selected by ``settings.targets`` get masks, the others
    are untouched (fully trainable).
    """

    def __init__(self, params: dict[str, nn.Parameter], settings: SparseSettings, seed: int = 0):
        self.settings, self.seed, self.draws = settings, seed, 0
        want = ("lora_A", "lora_B") if settings.targets == "both" else (f"lora_{settings.targets}",)
        self.params = {k: p for k, p in params.items() if k.rsplit(".", 1)[-1] in want}
        self.masks: dict[str, torch.Tensor] = {}
        self._names = {id(p): k for k, p in self.params.items()}
        self.sample()

    def sample(self) -> None:
        """Draw new masks (draw ``k`` is seeded with ``seed + k``; the same on every device)."""
        gen = torch.Generator().manual_seed(self.seed + self.draws)
        self.draws += 1
        for name, p in self.params.items():
            rows, cols = p.shape
            shape = {"element": (rows, cols), "row": (rows, 1), "column": (1, cols)}[self.settings.granularity]
            coin = torch.rand(shape, generator=gen) < self.settings.keep
            self.masks[name] = coin.expand(rows, cols).to(p.device)

    def mask_grads(self) -> None:
        for name, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[name])

    def mask_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The current mask of parameter ``p`` (``True`` = trainable), or None when it has none."""
        name = self._names.get(id(p))
        return None if name is None else self.masks[name]

    @property
    def unmasked(self) -> int:
        """Entries free to change under the current masks."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def masked(self) -> int:
        return int(sum(m.numel() for m in self.masks.values())) - self.unmasked
