"""Adapter layers against independent references: PEFT's init, float64 maths, Linear vs Conv1D."""

import math

import pytest
import torch
from torch import nn

from lora_lens.train.inject import find_targets, inject
from lora_lens.train.layers import CondLoRALinear, CondTheta, LoRALinear, base_weight, kaiming_uniform

from .tolerances import U32, gamma


def lora_forward_bound(x, W0, b, A, B, s, inner):
    """Worst-case |float32 forward − exact| of ``y = x W0ᵀ + b + s·(x Aᵀ) Bᵀ`` (tests/tolerances.py): γ over the
    longest chain of sums (``inner``) times the magnitudes |x||W0|ᵀ + |b| + |s|·|x||A|ᵀ|B|ᵀ."""
    x, W0, b, A, B = (t.double().abs() for t in (x, W0, b, A, B))
    return gamma(inner) * (x @ W0.T + b + abs(s) * (x @ A.T) @ B.T).max().item()


class Conv1D(nn.Module):
    """GPT-2's Conv1D as transformers defines it: weight (n, m), y = x W + b."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_kaiming_uniform_is_peft_lora_a_init():
    ref = torch.empty(8, 48)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(1))
    ours = kaiming_uniform(8, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)


def test_lora_forward_and_merge_linear_and_conv1d():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    conv = Conv1D(5, 6)
    with torch.no_grad():
        conv.weight.copy_(lin.weight.T)
        conv.bias.copy_(lin.bias)
    x = torch.randn(3, 4, 6)
    layers = [LoRALinear(m, rank=2, alpha=3.0) for m in (lin, conv)]
    for layer in layers:
        layer.reset(torch.Generator().manual_seed(0))
        with torch.no_grad():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(5))
    assert layers[1].layout == "conv1d" and torch.equal(base_weight(conv), lin.weight)
    A, B = (t.double() for t in layers[0].factors())
    ref = x.double() @ (lin.weight.double() + 1.5 * B @ A).T + lin.bias.double()  # s = 3 / 2
    # n + r products and two additions on the way to each output (tests/tolerances.py)
    forward = lora_forward_bound(x, lin.weight, lin.bias, A, B, 1.5, inner=6 + 2 + 2)
    # merging rounds W0 + s·BA (a length-r product, then one addition): |δW| ≤ γ_{r+1}(|W0| + s|B||A|)
    merge = gamma(2 + 1) * (lin.weight.double().abs() + 1.5 * B.abs() @ A.abs()).max().item()
    for layer in layers:
        torch.testing.assert_close(layer(x).double(), ref, atol=forward, rtol=0)
        y = layer(x)
        layer.merge_()
        with torch.no_grad():
            layer.lora_B.zero_()
        # both outputs are within `forward` of the exact one, the merged weight moved by ≤ merge·Σ|x|
        merged_forward = forward + merge * x.abs().sum(-1).max().item() + U32 * ref.abs().max().item()
        torch.testing.assert_close(layer(x), y, atol=2 * merged_forward, rtol=0)
    # merged in the stored layout: each side's merged weight is within `merge` of the exact W0 + s·BA
    torch.testing.assert_close(conv.weight.T, lin.weight, atol=2 * merge, rtol=0)


@pytest.mark.parametrize("mode", ["official", "general"])
def test_condlora_factors_and_gradients_reach_theta(mode):
    torch.manual_seed(0)
    m, n = (6, 6) if mode == "official" else (4, 6)
    theta = CondTheta(m, n, rank=2, mode=mode)
    with torch.no_grad():
        theta.theta_A.normal_()
        theta.theta_B.normal_()
    bases = [nn.Linear(n, m).requires_grad_(False) for _ in range(2)]
    layers = [CondLoRALinear(b, theta, alpha=2.0) for b in bases]
    x = torch.randn(3, n)
    total = sum(layer(x).sum() for layer in layers)
    total.backward()
    assert theta.theta_A.grad is not None and theta.theta_B.grad is not None
    W0 = bases[0].weight.double()
    tA, tB = theta.theta_A.double(), theta.theta_B.double()
    A, B = (tA @ W0.T, W0 @ tB.T) if mode == "official" else (tA.T @ W0, W0 @ tB)
    ref = x.double() @ (W0 + 1.0 * B @ A).T + bases[0].bias.double()
    # A and B are themselves length-n products of Θ and W0, so the LoRA path is a chain of four products
    # (n, r, n, n) and the bound takes |A| ≤ |Θ_A||W0|…, |B| ≤ |W0||Θ_B|… (tests/tolerances.py)
    mA = tA.abs() @ W0.abs().T if mode == "official" else tA.abs().T @ W0.abs()
    mB = W0.abs() @ tB.abs().T if mode == "official" else W0.abs() @ tB.abs()
    atol = lora_forward_bound(x, W0, bases[0].bias, mA, mB, 1.0, inner=3 * n + 2 + 2)
    torch.testing.assert_close(layers[0](x).double(), ref, atol=atol, rtol=0)


def test_inject_keeps_paths_and_freezes_base():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleDict({"q_proj": nn.Linear(4, 4), "k_proj": nn.Linear(4, 4)}))
    targets = find_targets(model, ["q_proj", "0"])
    assert [p for p, _ in targets] == ["0", "1.q_proj"]
    layers = inject(model, targets, lambda p, m: LoRALinear(m, 2, 4))
    assert isinstance(model[1]["q_proj"], LoRALinear) and set(layers) == {"0", "1.q_proj"}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["0.lora_A", "0.lora_B", "1.q_proj.lora_A", "1.q_proj.lora_B"]
