"""Intruder-dimension reduction: PEFT's ``reduce_intruder_dimension``, on our files, factored at the end.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"), as PEFT implements
it (``peft.tuners.lora.intruders``). Per module, ``W (m, n)`` the base weight and ``ΔW = s·B A``:

1. ``W = X Σ₀ …`` and ``W + ΔW = Y Σ Vᵀ`` (full thin SVDs); ``m_j = max_i |x_iᵀ y_j|`` for the top
   ``k`` (``top_k``) ``y_j`` (:func:`lora_lens.compare.intruders.max_cosines`, the analysis's own score);
2. intruders ``I = {j < k : m_j < ε}``; none: the module is kept as it is;
3. ``ΔW' = ΔW − (1 − λ) Σ_{j∈I} σ_j y_j v_jᵀ`` (``λ`` = ``reduce``, PEFT's ``mitigation_lambda``: the
   share of each intruder direction that is kept), divided by ``s``;
4. refactored at the module's rank ``r``: the best rank-r approximation of ``ΔW'/s``, ``B' = U_r √Σ_r``,
   ``A' = √Σ_r V_rᵀ``, written with the same ``s``.

PEFT forms ``ΔW'`` and takes a dense SVD of it; here ``ΔW'/s = [B, −(1−λ)/s · Y_I Σ_I] [A; V_Iᵀ]`` is
already factored (rank ``r + |I|``), so step 4 is :func:`lora_lens.linalg.factored_svd` — same numbers,
no ``(m, n)`` SVD. Steps 1-2 need the full singular vectors of ``W`` (the max runs over all of them),
so ``W`` and ``W + ΔW`` go through one batched full SVD per chunk of same-shaped modules, as the
analysis does (:mod:`lora_lens.compare.intruders`).

Where we differ: everything is in PyTorch's ``(m, n)`` layout. PEFT takes the SVD of the weight as
stored, which for a GPT-2 ``Conv1D`` or an ``Embedding`` is ``(n, m)`` (input-space vectors) and then
writes factors of the transposed shape; and a Conv2d kernel is decomposed flattened
``(out, in·kh·kw)`` (PEFT's SVD of a 4-D tensor is a batch of ``kh × kw`` SVDs). For Linear modules
the result equals PEFT's (tested against the installed PEFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..compare.intruders import EPSILON, K, check_params, max_cosines
from ..compare.pairing import base_chunks, pair_with_base
from ..compute import Compute, as_compute
from ..errors import ConfigError, NonFiniteError
from ..io.base import BaseWeights, open_base
from ..io.layout import with_base_layouts
from ..jsonable import stamp
from ..linalg import factored_svd, svd
from ..precision import full_fp32
from ..types import Adapter, LoraModule
from .output import peft_other_tensors
from .resize import refuse_dora

#: PEFT's default ``mitigation_lambda``.
REDUCE = 0.75


@dataclass(frozen=True, eq=False)
class ModuleReduction:
    """One module: its intruders (indices among the top ``k``), their scores, and what changed.

    ``removed`` = ``‖ΔW' − ΔW‖_F`` before refactoring; ``truncation_error`` = ``‖ΔW'_r − ΔW'‖_F``
    (the part the rank-r refactoring drops, ``√Σ_{i>r} σ_i²`` of the factored SVD).
    """

    name: str
    intruders: tuple[int, ...]
    max_cos: tuple[float, ...]
    removed: float
    truncation_error: float
    module: LoraModule

    def to_dict(self) -> dict:
        return {"name": self.name, "intruders": list(self.intruders), "max_cos": list(self.max_cos),
                "removed": self.removed, "truncation_error": self.truncation_error, "rank": self.module.rank}


@dataclass(frozen=True)
class IntruderReduction:
    """:func:`reduce_intruders`' result."""

    adapter: str
    base: str
    out: str | None
    reduce: float
    top_k: int
    epsilon: float
    modules: tuple[ModuleReduction, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(len(m.intruders) for m in self.modules)

    def to_dict(self) -> dict:
        return stamp("intruder_reduction", {
            "adapter": self.adapter, "base": self.base, "out": self.out, "reduce": self.reduce, "top_k": self.top_k,
            "epsilon": self.epsilon, "total": self.total, "notes": list(self.notes),
            "modules": [m.to_dict() for m in self.modules]})


@full_fp32
def reduce_module(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor, s: float, k: int, epsilon: float,
                  lam: float, X: torch.Tensor | None = None, merged: tuple | None = None):
    """Steps 1-4 for one module: ``W0 (m, n)``, ``B (m, r)``, ``A (r, n)`` in the compute dtype.

    ``X``: the left singular vectors of ``W0`` and ``merged = (Y, S, Vh)`` the SVD of ``W0 + s B A`` when
    already computed (batched). Returns ``(intruders, max_cos, B' , A', removed, truncation_error)``.
    """
    if X is None or merged is None:
        X = svd(W0, fix_signs=False)[0]
        merged = svd(W0 + s * (B @ A), fix_signs=False)
    Y, S, Vh = merged
    kk = min(k, Y.shape[-1])
    cos = max_cosines(X, Y[:, :kk])  # (kk,)
    idx = [j for j in range(kk) if float(cos[j]) < epsilon]
    if not idx:
        return (), cos, B, A, 0.0, 0.0
    I = torch.tensor(idx, device=Y.device)
    r = B.shape[-1]
    removed = (1 - lam) * Y[:, I] * S[I]  # (m, |I|): (1 − λ) Y_I Σ_I
    Bc = torch.cat([B, -removed / s], -1)  # (m, r + |I|)
    Ac = torch.cat([A, Vh[I]], 0)  # (r + |I|, n)
    U2, S2, Vh2 = factored_svd(Bc, Ac)
    root = S2[:r].sqrt()
    trunc = float(S2[r:].double().pow(2).sum().sqrt())
    return tuple(idx), cos, U2[:, :r] * root, root[:, None] * Vh2[:r], float(torch.linalg.matrix_norm(
        removed.double()) if len(idx) else 0.0), trunc


def reduce_intruders(
    adapter: Adapter,
    base: BaseWeights | str | Path,
    out_dir: str | Path | None = None,
    *,
    reduce: float = REDUCE,
    top_k: int = K,
    epsilon: float = EPSILON,
    overwrite: bool = False,
    compute: Compute | None = None,
    **options,
) -> IntruderReduction:
    """Scale down the intruder dimensions of every module of ``adapter`` (module docstring); write a PEFT folder.

    ``reduce`` = λ in [0, 1]: 1 changes nothing, 0 removes the intruder directions of ``W + ΔW``
    entirely. Ranks and scalings are kept, so the written adapter has the input's shapes.
    """
    if not 0 <= float(reduce) <= 1:
        raise ConfigError(f"--reduce {reduce!r} is out of range; expected λ in [0, 1] (the share of each intruder "
                          "direction kept; PEFT's default 0.75).")
    (eps,) = check_params(top_k, epsilon)
    refuse_dora(adapter, "reduce")  # the output is plain LoRA: DoRA magnitudes would be lost
    cx = as_compute(compute, **options)
    base = base if isinstance(base, BaseWeights) else open_base(base)
    adapter = with_base_layouts(adapter, base)
    weights = pair_with_base(adapter, base)
    per_item = lambda m, n, r: (8 * m * n + 4 * (m + n) * min(m, n)) * cx.itemsize  # noqa: E731 (as the analysis)
    rows: dict[str, ModuleReduction] = {}
    for chunk in base_chunks(list(adapter), weights, base, cx, per_item, "intruders"):
        L = chunk.W0.shape[0]
        U, S, Vh = svd(torch.cat([chunk.W0, chunk.W0 + chunk.delta()]), fix_signs=False)
        if not bool(torch.isfinite(S).all()):
            raise NonFiniteError(f"{adapter.path}: W + ΔW of '{chunk.modules[0].name}' (chunk) is not finite; "
                                 "expected finite weights: use --dtype float64 or check the adapter.")
        for i, m in enumerate(chunk.modules):
            s = float(chunk.scaling[i])
            idx, cos, Bn, An, removed, trunc = reduce_module(
                chunk.W0[i], chunk.B[i], chunk.A[i], s, top_k, eps, float(reduce), U[i], (U[L + i], S[L + i],
                                                                                          Vh[L + i]))
            new = m if not idx else LoraModule(m.name, m.key, An.cpu().to(m.A.dtype).contiguous(),
                                               Bn.cpu().to(m.B.dtype).contiguous(), m.alpha, m.scaling, m.layout,
                                               "lora", m.stored_as, m.kernel)
            rows[m.name] = ModuleReduction(m.name, idx, tuple(float(c) for c in cos), removed, trunc, new)
    mods = tuple(rows[m.name] for m in adapter)
    notes = tuple(adapter.flags)
    odd = [m.name for m in adapter if m.layout in ("conv1d", "embedding", "conv")]
    if odd:
        notes += (f"{len(odd)} module(s) are Conv1D/Embedding/Conv2d ({odd[0]}, …): reduced in PyTorch's (m, n) "
                  "layout, where PEFT's reduce_intruder_dimension works on the stored tensor.",)
    if any(m.kind != "lora" for m in adapter):
        notes += ("LoKr/LoHa modules are written as plain LoRA factors of their ΔW.",)
    # a PEFT source's modules_to_save copies are written with the reduced modules (as resize does); others are not
    extra = peft_other_tensors(adapter) if adapter.format == "peft" else {}
    if adapter.other_tensors and not extra:
        notes += (f"{len(adapter.other_tensors)} tensor(s) that are not LoRA factors were not carried over.",)
    res = IntruderReduction(adapter.label, str(base.path), None if out_dir is None else str(out_dir), float(reduce),
                            int(top_k), eps, mods, notes)
    if out_dir is not None:
        from ..io.peft import save_peft_adapter

        save_peft_adapter(out_dir, [r.module for r in mods], base_model_name_or_path=str(base.path),
                          modules_to_save=(adapter.settings.modules_to_save or None) if extra else None,
                          extra_tensors=extra,
                          metadata={"lora_lens_intruders_reduced": f"lambda={float(reduce)} top_k={top_k} eps={eps}"},
                          overwrite=overwrite)
    return res
