"""LoRA-SP (Wu et al. 2024; docs/maths.md §8): update only a random half of the LoRA parameters.

A seeded Bernoulli(0.5) mask per factor says which entries may change. It is
applied to the *update*, not to the weights, in three places, so that nothing
an optimizer does can move a frozen entry:

1. :meth:`UpdateMasks.mask_grads` zeroes the gradient of frozen entries
   (before clipping, so the gradient norm counts trainable entries only);
2. :meth:`UpdateMasks.snapshot` before ``optimizer.step()`` and
   :meth:`UpdateMasks.restore` after it put the frozen entries back
   bit-for-bit, undoing AdamW's decoupled weight decay (``p ← p − lr·λ·p``,
   which ignores the gradient) and any step driven by old moments;
3. :meth:`UpdateMasks.restore` also zeroes the optimizer's per-entry state
   (Adam's moments) at frozen entries, so an entry that a re-sample unfreezes
   starts with fresh moments.

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
        self._saved: dict[str, torch.Tensor] = {}
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

    def snapshot(self) -> None:
        self._saved = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        for name, p in self.params.items():
            keep = self.masks[name]
            p.copy_(torch.where(keep, p, self._saved[name]))
            for value in optimizer.state.get(p, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value.mul_(keep)
        self._saved = {}

    @property
    def unmasked(self) -> int:
        """Entries free to change under the current masks."""
        return int(sum(int(m.sum()) for m in self.masks.values()))

    @property
    def masked(self) -> int:
        return int(sum(m.numel() for m in self.masks.values())) - self.unmasked
