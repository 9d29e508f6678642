"""AdamW with one step count per entry, for LoRA-SP's masks (docs/maths.md §8).

``torch.optim.AdamW`` keeps one step count ``t`` per tensor. Under LoRA-SP an
entry can be frozen for many steps and then unfrozen by a re-sampled mask; with
its moments zeroed and ``t`` still running, its first step is
``lr · (1−β1)/√(1−β2) · √(1−β2^t)/(1−β1^t)``: 2.5× lr at ``t = 1000``, ~3.2× lr for
large ``t`` (β = 0.9, 0.999), where Adam takes ``lr`` on a fresh entry.

Here each entry ``e`` has its own count ``n_e`` of the steps it was trainable.
At a step with mask ``M`` (``True`` = trainable), for every entry with ``M_e``:

    n_e ← n_e + 1
    p_e ← p_e · (1 − lr·λ)                          (decoupled weight decay)
    m_e ← β1·m_e + (1−β1)·g_e,   v_e ← β2·v_e + (1−β2)·g_e²
    p_e ← p_e − lr · (m_e / (1−β1^{n_e})) / (√(v_e / (1−β2^{n_e})) + ε)

and frozen entries keep ``p``, ``m``, ``v`` and ``n`` bit-for-bit. So every entry
follows Adam over its own trainable steps only: a re-unfrozen entry resumes
with the moments it had (a never-trained one starts fresh, its first step
``lr·|g|/(|g|+ε) ≤ lr``), and with every mask all-True this is
``torch.optim.AdamW`` (same operations, in the same order).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

MaskOf = Callable[[torch.Tensor], "torch.Tensor | None"]


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW where ``mask_of(param)`` (a bool tensor of the param's shape, or None = all trainable) gates each entry."""

    def __init__(self, params: Iterable[torch.Tensor], mask_of: MaskOf, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.mask_of = mask_of

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros_like(p)  # per-entry count of trainable steps
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                mask = self.mask_of(p)
                active = torch.ones_like(p, dtype=torch.bool) if mask is None else mask
                n = torch.where(active, state["step"] + 1, state["step"])
                g = p.grad
                m = state["exp_avg"].lerp(g, 1 - beta1)
                v = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
                # bias corrections with each entry's own count (entries at n = 0 are frozen: any value, unused)
                bc1 = 1 - torch.pow(beta1, n.clamp(min=1))
                bc2_sqrt = (1 - torch.pow(beta2, n.clamp(min=1))).sqrt()
                denom = (v.sqrt() / bc2_sqrt).add_(eps)
                new = p.mul(1 - lr * wd).sub_((lr / bc1) * (m / denom))  # torch's order: p − (lr/bc1)·(m/denom)
                p.copy_(torch.where(active, new, p))
                state["exp_avg"] = torch.where(active, m, state["exp_avg"])
                state["exp_avg_sq"] = torch.where(active, v, state["exp_avg_sq"])
                state["step"] = n
        return loss
