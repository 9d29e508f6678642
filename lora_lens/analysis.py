"""Every analysis the report shows, run once and kept (what ``lora-lens report`` computes).

:func:`analyze_adapters` runs, per adapter, the spectra of ΔW, the layer × layer
φ grids, and (given a base) alignment with W0 and intruder dimensions; with
several adapters, φ between every pair. The result is plain data:
:mod:`lora_lens.report.analysis` draws it, :meth:`Analysis.to_dict` is its JSON.
This module computes only; it never imports matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .compare import AlignmentAnalysis, LayerSimilarity, analyze_alignment, layer_similarity, pairwise_similarity
from .compare.similarity import AdapterSimilarity
from .compute import Compute, Progress, as_compute
from .io.base import BaseWeights, open_base
from .io.formats import load_adapter
from .jsonable import stamp
from .spectra import AdapterSpectra, adapter_spectra
from .types import Adapter

#: Intruder ε values swept for the sweep figure (the chosen ε is always added).
EPS_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True, eq=False)
class AdapterAnalysis:
    """Everything measured on one adapter."""

    adapter: Adapter
    spectra: AdapterSpectra
    layers: LayerSimilarity
    alignment: AlignmentAnalysis | None = None


@dataclass(frozen=True, eq=False)
class Analysis:
    """:func:`analyze_adapters`' result: per adapter, plus every pair compared."""

    adapters: tuple[AdapterAnalysis, ...]
    pairs: tuple[AdapterSimilarity, ...] = ()
    base: str | None = None
    runs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    epsilon: float = 0.5
    intruder_k: int = 10

    def to_dict(self) -> dict:
        # Reshaped: an Adapter holds tensors; only its label and path go to JSON, pairs without their grids.
        return stamp("analysis", {
            "base": self.base,
            "adapters": [
                {
                    "label": a.adapter.label,
                    "path": str(a.adapter.path),
                    "spectra": a.spectra.to_dict(),
                    "layer_similarity": a.layers.to_dict(),
                    "alignment": a.alignment.to_dict() if a.alignment else None,
                }
                for a in self.adapters
            ],
            "pairs": [p.to_dict(grids=False) for p in self.pairs],
            "runs": {k: dict(v) for k, v in self.runs.items()},
        })


def analyze_adapters(
    adapters: Sequence[Adapter | str | Path],
    base: BaseWeights | str | Path | None = None,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    energy: float = 0.9,
    intruder_k: int = 10,
    epsilon: float = 0.5,
    side: str | None = None,
    progress: Progress | None = None,
    compute: Compute | None = None,
    **options,
) -> Analysis:
    """Run every analysis the report shows. ``runs``: loss curves (``TrainResult.curves()`` format).

    ``progress(done, total, what)`` is called after each stage (spectra,
    layer similarity, alignment of each adapter; the adapter pairs).
    ``compute`` (or its fields as keywords) is resolved once and shared by every analysis.
    ``side``: which singular vectors of ΔW the layer grids and the pairs compare (``out``, the default,
    ``in`` or ``both``; :func:`~lora_lens.compare.adapter_similarity`).
    Adapters and the base may be given as paths, as :func:`~lora_lens.spectra.adapter_spectra` takes them.
    """
    cx = as_compute(compute, **options)
    adapters = unique_labels([load_adapter(a) if isinstance(a, (str, Path)) else a for a in adapters])
    base = open_base(base) if isinstance(base, (str, Path)) else base
    eps = sorted(set(EPS_SWEEP) | {epsilon})
    total = len(adapters) * (2 if base is None else 3) + (len(adapters) > 1)
    done = 0

    def stage(what: str, result):
        nonlocal done
        done += 1
        if progress:
            progress(done, total, what)
        return result

    per = []
    for ad in adapters:
        per.append(AdapterAnalysis(
            adapter=ad,
            spectra=stage(f"{ad.label}: spectra", adapter_spectra(ad, energy=energy, compute=cx)),
            layers=stage(f"{ad.label}: layers", layer_similarity(ad, what="delta", side=side, compute=cx)),
            alignment=stage(f"{ad.label}: alignment", analyze_alignment(
                ad, base, intruder_k=intruder_k, epsilon=eps, compute=cx))
            if base is not None else None,
        ))
    pairs = (stage("adapter pairs", tuple(pairwise_similarity(list(adapters), side=side, compute=cx)))
             if len(adapters) > 1 else ())
    return Analysis(tuple(per), pairs, str(base.path) if base is not None else None, dict(runs or {}), epsilon,
                    intruder_k)


def unique_labels(adapters: Sequence[Adapter]) -> list[Adapter]:
    """Adapters whose labels collide (``x1/ad``, ``x2/ad``) are labelled ``x1/ad``, ``x2/ad``."""
    labels = [a.label for a in adapters]
    return [replace(a, adapter_name=f"{a.path.parent.name}/{a.label}") if labels.count(a.label) > 1 else a
            for a in adapters]
