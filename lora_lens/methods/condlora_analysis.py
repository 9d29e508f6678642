"""CondLoRA analysis (Kim et al., LREC-COLING 2024; docs/maths.md §5): conversion matrices across layers.

For a trained adapter, the per-layer conversion matrices solve the
parameterization's equations (:mod:`lora_lens.methods.condlora`) for ``Θ``
layer by layer: official ``W0 C_A = Aᵀ``, ``W0 C_B = B`` (exact solve,
``W0⁻¹``); general ``W0ᵀ C_A = Aᵀ`` (``C_A (m, r)``), ``W0 C_B = B``
(``C_B (n, r)``), least squares / minimum norm with the relative residual
reported. Layers are compared pairwise by φ of the conversion matrices' left
singular vectors with ``i = j = r``, beside two baselines: Gaussian ``(d, r)``
matrices, and ``W0⁻¹ G`` (the same solve applied to a Gaussian right-hand
side), which shows how much cross-layer similarity ``W0`` alone creates.
Layout is PyTorch's: ``W0 (m, n)``, ``A (r, n)``, ``B (m, r)``; ``L`` layers, ``r`` rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..chunks import chunks, load_w0, stack
from ..compare.baselines import deeper_half
from ..compute import Compute, as_compute
from ..errors import ConfigError, ShapeError
from ..io.base import BaseWeights, open_base
from ..io.formats import load_adapter
from ..io.layout import with_base_layouts
from ..jsonable import JsonFields, to_jsonable
from ..linalg import lstsq, phi, svd
from ..precision import full_fp32
from ..types import Adapter
from .condlora import EQUATIONS, SIDES, condlora_modes


@dataclass(frozen=True, eq=False)
class ConversionGrid:
    """Cross-layer similarity of one module type's conversion matrices for one side.

    ``phi``, ``gaussian``, ``structural``: ``(L, L)`` φ grids in layer order
    (the conversion matrices, Gaussian ``(d, r)`` matrices, and ``W0⁻¹ G``);
    ``residual (L,)``: ``‖S C − F‖_F / ‖F‖_F`` of each layer's solve (0 for an
    exact solve); ``dim``: ``d``, the rows of ``C``.
    """

    module_type: str
    side: str
    equation: str
    blocks: tuple
    modules: tuple[str, ...]
    ranks: tuple[int, ...]
    dim: int
    phi: torch.Tensor
    gaussian: torch.Tensor
    structural: torch.Tensor
    residual: torch.Tensor
    #: Readable block paths where ``blocks`` are position codes (diffusion UNets), else ``None`` each.
    block_names: tuple[str | None, ...] = ()

    def summary(self) -> dict:
        """Mean off-diagonal φ (all layers, and among the deeper half, ``compare.baselines.DEEPER_HALF``)
        for the grid and its baselines."""
        L = len(self.blocks)
        deep = deeper_half(L)
        out = {}
        for name, grid in (("phi", self.phi), ("gaussian", self.gaussian), ("structural", self.structural)):
            out[f"{name}_offdiag"] = _offdiag_mean(grid, list(range(L)))
            out[f"{name}_offdiag_deep"] = _offdiag_mean(grid, deep)
        out["random_expectation"] = max(self.ranks) / self.dim if self.ranks else None
        out["residual_max"] = float(self.residual.max()) if L else None
        out["residual_mean"] = float(self.residual.mean()) if L else None
        return out

    def to_dict(self) -> dict:
        # reshaped: the baselines get their documented names, and the summary is added
        return {
            "module_type": self.module_type, "side": self.side, "equation": self.equation,
            "blocks": list(self.blocks), "block_names": list(self.block_names), "modules": list(self.modules),
            "ranks": list(self.ranks), "dim": self.dim,
            "phi": to_jsonable(self.phi), "gaussian_baseline": to_jsonable(self.gaussian),
            "structure_baseline": to_jsonable(self.structural), "residual": to_jsonable(self.residual),
            "summary": self.summary(),
        }


@dataclass(frozen=True, eq=False)
class CondLoraAnalysis(JsonFields):
    """Every module type × side grid of an adapter, plus what was skipped."""

    KIND = "condlora_analysis"

    grids: tuple[ConversionGrid, ...]
    adapter: str
    base: str
    seed: int
    skipped: tuple[str, ...] = ()
    #: The adapter's short name (:attr:`Adapter.label`) for tables; ``adapter`` is its path.
    label: str = ""

    def grid(self, module_type: str, side: str) -> ConversionGrid:
        for g in self.grids:
            if g.module_type == module_type and g.side == side:
                return g
        raise KeyError(f"no grid for {module_type!r} side {side!r}")


@full_fp32
def condlora_analysis(
    adapter: Adapter | str | Path,
    base: BaseWeights | str | Path,
    *,
    rcond: float | None = None,
    mode: str = "auto",
    compute: Compute | None = None,
    **options,
) -> CondLoraAnalysis:
    """Conversion matrices of a trained adapter and their cross-layer φ grids (docs/maths.md §5).

    ``mode``: ``auto`` (official equations for square ``W0``, general ones
    otherwise), ``official`` (refuses non-square) or ``general``. Layers are
    solved batched by shape, ``compute.max_memory`` bytes at a time; ``rcond``
    cuts small singular values in the least-squares path. Embedding and Conv2d
    modules are skipped (listed in ``skipped``). The Gaussian baselines of each
    layer are drawn from a generator seeded by its module name and
    ``compute.seed``, so no number depends on the chunking.
    """
    cx = as_compute(compute, **options)
    adapter = adapter if isinstance(adapter, Adapter) else load_adapter(adapter)
    base = base if isinstance(base, BaseWeights) else open_base(base)
    condlora_modes({}, mode)  # refuse an unknown mode before reading anything
    adapter = with_base_layouts(adapter, base)  # Linear vs Conv1D per module, as PEFT decides
    usable = [m for m in adapter if m.layout in ("linear", "conv1d")]
    skipped = tuple(m.name for m in adapter if m.layout not in ("linear", "conv1d"))
    if not usable:
        raise ConfigError(f"{adapter.path}: no Linear or Conv1D LoRA modules to analyse (only {list(skipped)[:3]}).")
    weights = base.weight_names_for([m.name for m in usable])
    grids = []
    for mt in dict.fromkeys(m.key.module for m in usable):
        mods = sorted((m for m in usable if m.key.module == mt), key=lambda m: m.key.sort_key())
        grids += _analyse_type(mt, mods, weights, base, mode, rcond, cx)
    return CondLoraAnalysis(tuple(grids), str(adapter.path), str(base.path), cx.seed, skipped, label=adapter.label)


def _analyse_type(mt, mods, weights, base, mode, rcond, cx: Compute) -> list[ConversionGrid]:
    for m in mods:
        info = base.info(weights[m.name])
        if tuple(info.shape) != m.base_shape:
            raise ShapeError(f"{base.path}: '{weights[m.name]}' is {tuple(info.shape)} but adapter module '{m.name}' "
                             f"expects {m.base_shape}; check that --base is the model the adapter was trained on.")
    # the rule shared with the init files and the trainer; a non-square layer decides for its type
    shape = next((m.shape for m in mods if m.shape[0] != m.shape[1]), mods[0].shape)
    eq = condlora_modes({mt: shape}, mode)[mt]
    L = len(mods)
    # Gaussian draws per layer and side from the layer's own generator, so results do not depend on chunking.
    draws = []
    for m in mods:
        gen = torch.Generator().manual_seed(cx.seed_for(m.name))
        mm, nn_ = m.shape
        d = {"A": nn_ if eq == "official" else mm, "B": nn_}  # rows of C (its space)
        rows = {"A": nn_, "B": mm}  # rows of the right-hand side
        draws.append({s: (torch.randn(d[s], m.rank, generator=gen, dtype=torch.float64),
                          torch.randn(rows[s], m.rank, generator=gen, dtype=torch.float64)) for s in SIDES})
    U = {s: {k: [None] * L for k in ("conv", "gauss", "struct")} for s in SIDES}
    resid = {s: torch.zeros(L, dtype=torch.float64) for s in SIDES}
    pos = {m.name: i for i, m in enumerate(mods)}

    def per_item(key) -> int:  # W0 and its LU/SVD workspace, factors, right-hand sides and solutions
        (mm, nn_), r = key
        return (3 * mm * nn_ + 8 * (mm + nn_) * r) * cx.itemsize

    for ((mm, nn_), r), chunk in chunks(mods, lambda m: (m.shape, m.rank), per_item, cx, lambda _: mt):
        idx = [pos[m.name] for m in chunk]
        W = stack(cx, chunk, lambda m: load_w0(base, weights[m.name], m.layout, m.shape))  # (c, m, n)
        A = stack(cx, chunk, lambda m: m.A)  # (c, r, n)
        B = stack(cx, chunk, lambda m: m.B)  # (c, m, r)
        F = {"A": A.transpose(-1, -2), "B": B}  # (c, n, r), (c, m, r)
        Gs = {s: stack(cx, idx, lambda i: draws[i][s][1]) for s in SIDES}
        X = _solve_sides(W, F, Gs, eq, rcond)
        for s in SIDES:
            C, Cg = X[s][..., :r], X[s][..., r:]
            system = W.transpose(-1, -2) if (eq == "general" and s == "A") else W
            res = torch.linalg.matrix_norm(system @ C - F[s]) / torch.linalg.matrix_norm(F[s]).clamp_min(1e-30)
            gauss = stack(cx, idx, lambda i: draws[i][s][0])
            for key, M in (("conv", C), ("struct", Cg), ("gauss", gauss)):
                Uk = svd(M)[0].cpu()  # (c, d, r) left singular vectors
                for j, i in enumerate(idx):
                    U[s][key][i] = Uk[j]
            zero = torch.linalg.matrix_norm(F[s]) == 0
            for j, i in enumerate(idx):
                resid[s][i] = float(res[j])
                if zero[j]:  # an all-zero factor (untrained B): its C is 0 and has no subspace
                    U[s]["conv"][i] = None
    out = []
    for s in SIDES:
        out.append(ConversionGrid(
            module_type=mt, side=s, equation=EQUATIONS[(eq, s)], blocks=tuple(m.key.block for m in mods),
            block_names=tuple(m.key.block_name for m in mods),
            modules=tuple(m.name for m in mods), ranks=tuple(m.rank for m in mods), dim=int(U[s]["gauss"][0].shape[0]),
            phi=_layer_phi(U[s]["conv"]), gaussian=_layer_phi(U[s]["gauss"]), structural=_layer_phi(U[s]["struct"]),
            residual=resid[s],
        ))
    return out


def _solve_sides(W, F, Gs, eq, rcond) -> dict[str, torch.Tensor]:
    """``X_s = S_s⁺ [F_s | G_s]`` per side; one solve for both sides when they share ``S = W0``."""
    if eq == "official":
        r = F["A"].shape[-1]
        X, _ = lstsq(W, torch.cat([F["A"], Gs["A"], F["B"], Gs["B"]], -1), rcond=rcond)
        return {"A": X[..., : 2 * r], "B": X[..., 2 * r:]}
    XA, _ = lstsq(W.transpose(-1, -2), torch.cat([F["A"], Gs["A"]], -1), rcond=rcond)
    XB, _ = lstsq(W, torch.cat([F["B"], Gs["B"]], -1), rcond=rcond)
    return {"A": XA, "B": XB}


def _layer_phi(Us: list[torch.Tensor | None]) -> torch.Tensor:
    """``(L, L)`` φ between every pair of per-layer bases (i = j = all columns), clamped to [0, 1].

    NaN where a layer has no subspace (``None``: an all-zero factor) or two
    layers' dimensions differ.
    """
    L = len(Us)
    shapes = {tuple(u.shape) for u in Us if u is not None}
    if len(shapes) == 1 and all(u is not None for u in Us):
        U = torch.stack(Us).double()  # (L, d, r)
        return phi(U[:, None], U[None, :]).clamp(0.0, 1.0)
    out = torch.full((L, L), float("nan"), dtype=torch.float64)
    for a in range(L):
        for b in range(L):
            if Us[a] is not None and Us[b] is not None and Us[a].shape[0] == Us[b].shape[0]:
                out[a, b] = phi(Us[a].double(), Us[b].double()).clamp(0.0, 1.0)
    return out


def _offdiag_mean(grid: torch.Tensor, idx: list[int]) -> float | None:
    if len(idx) < 2:
        return None
    sub = grid[idx][:, idx]
    mask = ~torch.eye(len(idx), dtype=torch.bool)
    vals = sub[mask]
    vals = vals[~torch.isnan(vals)]
    return float(vals.mean()) if vals.numel() else None


# ------------------------------------------------------------------------------------------------- init
