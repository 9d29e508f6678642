"""Target resolution, Conv1D detection and the streamed stacked least squares."""

import numpy as np
import pytest
import torch

from lora_lens import KeyMatchError, open_base
from lora_lens.keys import resolve_targets
from lora_lens.methods import target_layers
from lora_lens.io.layout import is_conv1d_base
from lora_lens.linalg import stacked_lstsq

TYPES = ["self_attn.q_proj", "self_attn.k_proj", "attn.c_proj", "mlp.c_proj", "mlp.up_proj"]


def test_resolve_targets_suffix_at_dot_boundary():
    assert resolve_targets("q_proj, k_proj", TYPES) == ["self_attn.q_proj", "self_attn.k_proj"]
    assert resolve_targets(["c_proj"], TYPES) == ["attn.c_proj", "mlp.c_proj"]
    assert resolve_targets(["mlp.c_proj", "up_proj"], TYPES) == ["mlp.c_proj", "mlp.up_proj"]
    with pytest.raises(KeyMatchError) as e:
        resolve_targets("proj,q_proj,zz", TYPES)  # "proj" is no dot-boundary suffix
    msg = str(e.value)
    assert "['proj', 'zz']" in msg and "self_attn.q_proj" in msg
    with pytest.raises(KeyMatchError, match="no targets"):
        resolve_targets(" , ", TYPES)


def test_target_layers_shapes_and_layouts(tiny_llama, tiny_gpt2):
    layers = target_layers(open_base(tiny_llama[1]), "k_proj")
    ls = layers["self_attn.k_proj"]
    assert [x.key.block for x in ls] == [0, 1, 2] and ls[0].shape == (16, 32) and ls[0].layout == "linear"
    assert ls[0].module == "model.layers.0.self_attn.k_proj"
    base = open_base(tiny_gpt2[1])
    assert is_conv1d_base(base) and not is_conv1d_base(open_base(tiny_llama[1]))
    g = target_layers(base, "c_attn")["attn.c_attn"][0]
    assert g.shape == (96, 32) and g.layout == "conv1d"
    with pytest.raises(KeyMatchError, match="available module types"):
        target_layers(base, "wte")  # not a per-block weight


@pytest.mark.parametrize("p,q", [(7, 4), (3, 8)])  # overdetermined stack; rank-deficient (wide) blocks
def test_stacked_lstsq_matches_numpy(p, q):
    gen = torch.Generator().manual_seed(0)
    Ms = [torch.randn(p, q, generator=gen, dtype=torch.float64) for _ in range(2 if q > p else 5)]
    Ys = [torch.randn(p, 3, generator=gen, dtype=torch.float64) for _ in Ms]
    X = stacked_lstsq(zip(Ms, Ys))
    ref = np.linalg.lstsq(torch.cat(Ms).numpy(), torch.cat(Ys).numpy(), rcond=None)[0]  # min-norm too
    np.testing.assert_allclose(X.numpy(), ref, atol=1e-10)

