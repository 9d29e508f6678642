"""Load a folder with the real PEFT library and insist that every key matched."""

from __future__ import annotations

import copy
import warnings

import pytest


def load_with_peft(model, folder):
    """``PeftModel.from_pretrained`` on a copy of ``model``; fails on missing or unexpected adapter keys."""
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder)
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    result = pm.load_adapter(folder, adapter_name="check")  # the load result PEFT only returns from load_adapter
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == [], result
    pm.delete_adapter("check")
    pm.set_adapter("default")
    return pm.eval()


def token_ids(vocab: int, seed: int = 0, shape=(2, 12)):
    import torch

    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
