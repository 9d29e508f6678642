"""Adapters for tests, shared by conftest's fixtures and the tests that need a variant of them.

``make_peft_adapter`` writes an adapter with the real PEFT library; ``write_planted_collection`` writes a
collection with known groups. Test modules import these from here, never from ``conftest`` or each other.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _seed(seed: int = 0) -> None:
    torch.manual_seed(seed)


def make_peft_adapter(model, folder: Path, seed: int = 0, safe: bool = True, **lora_kwargs):
    """Wrap ``model`` with PEFT LoRA (random non-zero B), save it, return the PeftModel."""
    peft = pytest.importorskip("peft")
    import copy

    _seed(seed)
    cfg = peft.LoraConfig(init_lora_weights=False, lora_dropout=0.0, **lora_kwargs)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(folder, safe_serialization=safe)
    return pm


#: The planted collection: GROUPS groups of PER_GROUP adapters, then a duplicate of adapter 0, then an outlier.
PLANTED = {"groups": 3, "per_group": 4, "rank": 4, "m": 40, "n": 56, "layers": 2}


def write_planted_collection(folder: Path, seed: int = 0) -> tuple[list[Path], list[int]]:
    """Adapters whose ΔW share a group subspace (left and right) plus 1 % noise; returns (paths, true groups).

    Adapter ``groups·per_group`` is adapter 0 plus 1e-4 noise (a near-duplicate, in group 0);
    the last one has Haar-random factors (an outlier, its own group). Modules: q_proj and
    v_proj in ``layers`` Llama-style blocks, ``(m, n)`` with rank ``r``, written by lora_lens's
    PEFT writer.
    """
    from lora_lens.io import save_peft_adapter
    from lora_lens.keys import parse_module_path
    from lora_lens.types import LoraModule

    P = PLANTED
    g = torch.Generator().manual_seed(seed)
    r, m, n = P["rank"], P["m"], P["n"]
    names = [f"model.layers.{b}.self_attn.{t}" for b in range(P["layers"]) for t in ("q_proj", "v_proj")]

    def orth(d):
        return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]

    subspaces = [{nm: (orth(m), orth(n)) for nm in names} for _ in range(P["groups"])]

    def factors(grp):
        out = {}
        for nm in names:
            if grp is None:
                out[nm] = (torch.randn(m, r, generator=g, dtype=torch.float64),
                           torch.randn(r, n, generator=g, dtype=torch.float64))
                continue
            Ug, Vg = subspaces[grp][nm]
            B = Ug @ torch.randn(r, r, generator=g, dtype=torch.float64)
            A = torch.randn(r, r, generator=g, dtype=torch.float64) @ Vg.T
            out[nm] = (B + 0.01 * B.norm() / (m * r) ** 0.5 * torch.randn(m, r, generator=g, dtype=torch.float64),
                       A + 0.01 * A.norm() / (n * r) ** 0.5 * torch.randn(r, n, generator=g, dtype=torch.float64))
        return out

    truth = [grp for grp in range(P["groups"]) for _ in range(P["per_group"])]
    sets = [factors(grp) for grp in truth]
    sets.append({nm: (B + 1e-4 * torch.randn(m, r, generator=g, dtype=torch.float64), A)
                 for nm, (B, A) in sets[0].items()})
    truth.append(0)
    sets.append(factors(None))
    truth.append(P["groups"])
    paths = []
    for i, fs in enumerate(sets):
        mods = [LoraModule(nm, parse_module_path(nm), A.float(), B.float(), alpha=float(r), scaling=1.0)
                for nm, (B, A) in fs.items()]
        paths.append(save_peft_adapter(folder / f"a{i:02d}", mods))
    return paths, truth
