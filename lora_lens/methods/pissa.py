"""PiSSA (Meng et al., 2024): LoRA initialized on W0's principal components (docs/maths.md §9).

For each target ``W0 (m, n) = U S Vᵀ`` (PyTorch layout), with ``s = alpha / r``
and ``S'_r = S_r / s``:

    B = U_r S'_r^½ (m, r),   A = S'_r^½ V_rᵀ (r, n),   so  s·B A = U_r S_r V_rᵀ,

exactly as PEFT's ``LoraLayer.pissa_init`` does (it divides ``S_r`` by the
scaling before splitting it between the factors), and the frozen base becomes
the residual ``W0 − s·B A``. ``niter=None`` is PEFT's ``"pissa"`` (exact SVD);
an integer is ``"pissa_niter_<k>"`` (randomized, ``k`` power iterations; we
also oversample by 16, which PEFT's ``svd_lowrank`` call does not).

The output folder is a PEFT adapter plus ``residual_model.safetensors``: every
base tensor, with the residual in place of each target (in its stored layout and
dtype), so base + adapter computes what the original base computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..chunks import load_w0
from ..compute import Compute, as_compute
from ..decompose import decompose_base
from ..errors import ConfigError
from ..io.atomic import atomic_directory, atomic_save_safetensors
from ..io.base import BaseWeights, open_base
from ..io.initfile import InitDescription, write_init_description
from ..io.peft import save_peft_adapter
from ..precision import full_fp32
from .result import InitResult, provenance
from .targets import check_rank, lora_module, stored_layout, target_layers

RESIDUAL_NAME = "residual_model.safetensors"


@full_fp32
def pissa_init(
    base: BaseWeights | str | Path,
    rank: int,
    targets: str | Sequence[str],
    *,
    out_dir: str | Path,
    alpha: float | None = None,
    niter: int | None = None,
    overwrite: bool = False,
    compute: Compute | None = None,
    **options,
) -> InitResult:
    """Write a PiSSA init folder (see the module docstring); ``alpha`` defaults to ``rank``.

    The residual is computed in ``dtype`` and stored in each weight's own
    dtype (a bf16 base rounds it). The whole residual model is assembled in
    memory before the atomic write. The randomized sketch of each weight is
    seeded from its name and ``compute.seed``.
    """
    cx = as_compute(compute, **options)
    base = base if isinstance(base, BaseWeights) else open_base(base)
    layers = target_layers(base, targets)
    check_rank(rank, layers)
    if niter is not None and niter < 0:
        raise ConfigError(f"niter must be ≥ 0 (power iterations); got {niter}.")
    alpha = float(rank if alpha is None else alpha)
    s = alpha / rank
    flat = [x for ls in layers.values() for x in ls]
    spectra = decompose_base(base, [x.weight for x in flat], k=rank, layouts={x.weight: x.layout for x in flat},
                             randomized=niter is not None, n_iter=niter or 0, compute=cx)
    modules, records, residual = [], [], {}
    for x in flat:
        sp = spectra[x.weight]  # U (m, r), S (r,), Vh (r, n)
        root = (sp.S / s).sqrt()  # S'_r^½
        B = sp.U * root  # (m, r)
        A = root[:, None] * sp.Vh  # (r, n)
        W = load_w0(base, x.weight, x.layout, x.shape).to(sp.U.dtype)  # (m, n)
        stored = base.info(x.weight).dtype
        residual[x.weight] = stored_layout(W - s * (B @ A), x.layout).to(_torch_dtype(stored, W.dtype))
        modules.append(lora_module(x, A.float(), B.float(), alpha))
        frob2 = float((W.double() ** 2).sum())
        records.append({"module": x.module, "shape": list(x.shape), "sigma_first": float(sp.S[0]),
                        "sigma_last": float(sp.S[-1]), "exact": sp.exact,
                        "energy": float((sp.S.double() ** 2).sum()) / frob2 if frob2 > 0 else 0.0})
    params = {"niter": niter, "seed": cx.seed, "residual_file": RESIDUAL_NAME}
    sources = [str(base.path)]
    desc = InitDescription(method="pissa", rank=rank, alpha=alpha, targets=list(layers), mode=None, frozen=[],
                           peft_adapter=".", params=params, sources=sources)
    meta = provenance("pissa", params, sources)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_peft_adapter(tmp, modules, metadata=meta, base_model_name_or_path=str(base.path), overwrite=True)
        full = {name: residual[name] if name in residual else _copy(base, name) for name in base.names()}
        atomic_save_safetensors(full, tmp / RESIDUAL_NAME, meta)
        write_init_description(tmp, desc)
    return InitResult(Path(out_dir), desc, tuple(records), {"modules": len(modules), "residual_file": RESIDUAL_NAME})


def _torch_dtype(name: str, default: torch.dtype) -> torch.dtype:
    dt = getattr(torch, name, None)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else default


def _copy(base: BaseWeights, name: str) -> torch.Tensor:
    """A base tensor as stored (integer buffers included); pickled tied weights are cloned apart for safetensors."""
    t = base.store.get(name, validate=False)
    return t if base.format == "safetensors" else t.clone()
