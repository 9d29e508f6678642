"""The rank rules of resize / extract against sd-scripts' own index functions (reimplemented below
from resize_lora.py, without its ``len(S) - 1`` cap) and PEFT's energy cutoff."""

import pytest
import torch

from lora_lens.errors import ConfigError
from lora_lens.ops import select_rank


def sd_scripts_index(S, method, target):
    # sd-scripts networks/resize_lora.py, index_sv_* (cap at len(S) - 1 dropped, see rank_rules)
    if method == "sv_ratio":
        idx = int(torch.sum(S > S[0] / target).item())
    elif method == "sv_cumulative":
        idx = int(torch.searchsorted(torch.cumsum(S, 0) / float(S.sum()), target)) + 1
    else:
        sq = S.pow(2)
        idx = int(torch.searchsorted(torch.cumsum(sq, 0) / float(sq.sum()), target ** 2)) + 1
    return max(1, min(idx, len(S)))


@pytest.mark.parametrize("method,params", [("sv_ratio", [1, 1.5, 2, 10, 1e6]),
                                           ("sv_cumulative", [0.1, 0.5, 0.9, 0.99, 1.0]),
                                           ("sv_fro", [0.1, 0.5, 0.9, 0.99, 1.0])])
def test_rules_match_sd_scripts(method, params):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        S = torch.rand(16, generator=g, dtype=torch.float64).sort(descending=True).values
        for p in params:
            assert select_rank(S, method, p) == sd_scripts_index(S, method, p), (method, p, S)


def test_energy_cap_and_floor():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    # energy 9/14 = 0.643, 13/14 = 0.929: PEFT's smallest j reaching the fraction
    assert [select_rank(S, "energy", p) for p in (0.6, 0.7, 0.93, 1.0)] == [1, 2, 3, 3]
    assert select_rank(S, "rank", 8) == 4 and select_rank(S, "rank", 8, max_rank=2) == 2
    assert select_rank(torch.zeros(4), "sv_fro", 0.9) == 1  # a zero update keeps one zero pair


@pytest.mark.parametrize("method,param", [("rank", 0), ("rank", 1.5), ("sv_ratio", 0.5), ("sv_fro", 0),
                                          ("energy", 1.2), ("sv_cumulative", float("nan")), ("nope", 1)])
def test_out_of_range_refused(method, param):
    with pytest.raises(ConfigError):
        select_rank(torch.ones(3), method, param)
