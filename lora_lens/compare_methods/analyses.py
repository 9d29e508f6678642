"""Analyses of the trained adapters of one comparison, each beside its random baseline.

- ``seed_phi``: per method, φ between the ΔW subspaces of every pair of
  seeds (mean over modules and pairs), and the φ of random subspaces of the
  same sizes (:func:`lora_lens.compare.similarity.pairwise_similarity`).
  Chain's adapter is the concatenation of its links (rank ``links · r``).
- ``cora_overlap``: φ between what LoRA learned (ΔW's column space) and
  CoRA's frozen basis (cora-frozen's ΔW spans exactly ``B``), seed by seed.
- ``condlora_conversion``: the conversion matrices of LoRA's seed-0 adapter
  across layers (:func:`lora_lens.methods.condlora_analysis`), mean
  off-diagonal φ beside the Gaussian and the W0-aware (``W0⁻¹ G``) baselines:
  CondLoRA's premise is that the first is well above both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..compare.similarity import adapter_similarity, pairwise_similarity
from ..io import load_adapter, open_base
from ..methods import condlora_analysis


def _adapter(runs: Path, method: str, seed: int):
    folder = runs / f"{method}-seed{seed}"
    return load_adapter(folder / "peft" if method == "condlora" else folder)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def adapter_analyses(runs: Path, base: str | Path, methods: Sequence[str], seeds: Sequence[int],
                     device: str = "auto") -> dict:
    out: dict = {"seed_phi": {}, "cora_overlap": None, "condlora_conversion": None}
    adapters = {m: [_adapter(runs, m, s) for s in seeds] for m in methods if m != "head-only"}
    for m, ads in adapters.items():
        if len(ads) < 2:
            continue
        sims = pairwise_similarity(ads, what="delta", device=device)
        out["seed_phi"][m] = {"phi": _mean(s.summary()["phi"] for s in sims),
                              "random_phi": _mean(s.summary()["random_phi"] for s in sims), "pairs": len(sims)}
    if "lora" in adapters and "cora-frozen" in adapters:
        sims = [adapter_similarity(a, b, what="delta", device=device)
                for a, b in zip(adapters["lora"], adapters["cora-frozen"])]
        out["cora_overlap"] = {"phi": _mean(s.summary()["phi"] for s in sims),
                               "random_phi": _mean(s.summary()["random_phi"] for s in sims), "seeds": len(sims)}
    if "lora" in adapters:
        analysis = condlora_analysis(adapters["lora"][0], open_base(base), device=device)
        out["condlora_conversion"] = [
            {"module_type": g.module_type, "side": g.side, **{k: g.summary()[k] for k in (
                "phi_offdiag", "gaussian_offdiag", "structural_offdiag", "residual_max")}}
            for g in analysis.grids]
    return out
