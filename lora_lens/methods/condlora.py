"""CondLoRA (Kim et al., LREC-COLING 2024): the shared-Θ parameterization and Θ init files (docs/maths.md §5).

Layout is PyTorch's: ``W0 (m, n)``, ``A (r, n)``, ``B (m, r)``; a Conv1D base
weight is transposed on load. Legend: ``L`` layers, ``r`` rank.

**Parameterization.** One pair of linear maps per module type, shared by every
layer, turns each layer's frozen ``W0`` into its LoRA factors
(:func:`condlora_factors`):

- ``official`` (the paper's code, square ``W0``): ``A = Θ_A W0ᵀ``,
  ``B = W0 Θ_Bᵀ`` with ``Θ_A, Θ_B (r, n)``;
- ``general`` (ours, any shape): ``A = Θ_Aᵀ W0``, ``B = W0 Θ_B`` with
  ``Θ_A (m, r)``, ``Θ_B (n, r)``.

Which form a module type uses is decided per module type, by one rule
(:func:`condlora_modes`), in the analysis, the init files and the trainer alike:
``auto`` takes the official form where ``W0`` is square and the general one
elsewhere (GQA: square ``q_proj`` official, ``(n/2, n)`` ``v_proj`` general).

The conversion-matrix analysis lives in :mod:`lora_lens.methods.condlora_analysis`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..chunks import load_w0
from ..compute import Compute, as_compute
from ..errors import ConfigError, ShapeError
from ..io.atomic import atomic_directory, atomic_save_safetensors
from ..io.base import BaseWeights, open_base
from ..io.initfile import THETA_NAME, InitDescription, write_init_description
from ..io.formats import load_adapter
from ..io.peft import save_peft_adapter
from ..linalg import stacked_lstsq
from ..precision import full_fp32
from ..types import Adapter, LoraModule
from .result import InitResult, provenance
from .targets import TargetLayer, lora_module, target_layers

MODES = ("official", "general")
#: What a user may ask for: one of :data:`MODES` for every module type, or ``auto`` (per module type).
REQUESTS = ("auto",) + MODES
SIDES = ("A", "B")
EQUATIONS = {
    ("official", "A"): "W0 C_A = A^T",
    ("official", "B"): "W0 C_B = B",
    ("general", "A"): "W0^T C_A = A^T",
    ("general", "B"): "W0 C_B = B",
}


def condlora_modes(shapes: Mapping[str, tuple[int, int]], requested: str | None = "auto") -> dict[str, str]:
    """``{module type: "official" | "general"}`` for ``W0`` shapes ``(m, n)`` per module type: the one rule.

    ``auto`` (or None): ``official`` where ``m = n`` (the paper's form), ``general``
    elsewhere, per module type. ``official`` / ``general``: that form for every
    type; ``official`` on a non-square type is refused, naming every such type.
    """
    requested = "auto" if requested is None else requested
    if requested not in REQUESTS:
        raise ConfigError(f"unknown CondLoRA mode {requested!r}; expected one of {list(REQUESTS)}.")
    if requested == "official":
        bad = [f"{t} ({m}x{n})" for t, (m, n) in shapes.items() if m != n]
        if bad:
            raise ConfigError(f"official CondLoRA needs square W0, but {', '.join(bad[:3])}"
                              f"{' …' if len(bad) > 3 else ''} {'is' if len(bad) == 1 else 'are'} not; "
                              "use --mode general, or --mode auto for official only where W0 is square "
                              "(train: --condlora-mode).")
    if requested != "auto":
        return {t: requested for t in shapes}
    return {t: "official" if m == n else "general" for t, (m, n) in shapes.items()}


def summary_mode(modes: Mapping[str, str]) -> str:
    """One word for the JSON: the form every module type got, or ``auto`` when they differ (re-derived
    per module type by :func:`condlora_modes` on reading)."""
    forms = set(modes.values())
    return forms.pop() if len(forms) == 1 else "auto"


@full_fp32
def condlora_factors(theta_A: torch.Tensor, theta_B: torch.Tensor, W0: torch.Tensor,
                     mode: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """The LoRA factors that shared ``Θ`` gives for a frozen ``W0``; differentiable.

    ``W0 (..., m, n)`` in PyTorch's layout (transpose a Conv1D's stored
    weight); leading dimensions batch over layers. Returns ``A (..., r, n)``,
    ``B (..., m, r)``:

    - ``official`` (square ``W0``, ``m = n``): ``Θ_A (r, n)``, ``Θ_B (r, n)``;
      ``A = Θ_A W0ᵀ``, ``B = W0 Θ_Bᵀ``.
    - ``general``: ``Θ_A (m, r)``, ``Θ_B (n, r)``; ``A = Θ_Aᵀ W0``, ``B = W0 Θ_B``.

    The trainer calls this at every forward; inputs must share dtype and device.
    """
    m, n = W0.shape[-2:]
    if mode == "official":
        if m != n:
            raise ShapeError(f"official CondLoRA needs a square W0; got {m}x{n}. Use mode 'general'.")
        want_A, want_B = (theta_A.shape[0], n), (theta_B.shape[0], n)
        if tuple(theta_A.shape) != want_A or tuple(theta_B.shape) != want_B or theta_A.shape[0] != theta_B.shape[0]:
            raise ShapeError(f"official Θ must be theta_A (r, {n}) and theta_B (r, {n}); got "
                             f"{tuple(theta_A.shape)} and {tuple(theta_B.shape)}.")
        return theta_A @ W0.transpose(-1, -2), W0 @ theta_B.T
    if mode == "general":
        r = theta_A.shape[-1]
        if tuple(theta_A.shape) != (m, r) or tuple(theta_B.shape) != (n, r):
            raise ShapeError(f"general Θ must be theta_A ({m}, r) and theta_B ({n}, r); got "
                             f"{tuple(theta_A.shape)} and {tuple(theta_B.shape)}.")
        return theta_A.T @ W0, W0 @ theta_B
    raise ConfigError(f"unknown CondLoRA mode {mode!r}; expected one of {list(MODES)}.")


def theta_shapes(m: int, n: int, r: int, mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(theta_A shape, theta_B shape)`` for a module type of shape ``(m, n)``."""
    return ((r, n), (r, n)) if mode == "official" else ((m, r), (n, r))


# --------------------------------------------------------------------------------------------- analysis


def condlora_init(
    base: BaseWeights | str | Path,
    rank: int | None = None,
    targets: str | Sequence[str] | None = None,
    *,
    out_dir: str | Path,
    alpha: float | None = None,
    mode: str = "auto",
    from_adapter: Adapter | str | Path | None = None,
    overwrite: bool = False,
    rcond: float | None = None,
    compute: Compute | None = None,
    **options,
) -> InitResult:
    """Write a CondLoRA init folder: ``Θ`` per module type, and the per-layer A, B it gives as a PEFT adapter.

    Default ``Θ``: ``Θ_A`` Kaiming-uniform (``a = √5``, as
    ``torch.nn.init.kaiming_uniform_``) on the shape of the linear map it is —
    official ``Θ_A (r, n)``, fan-in ``n``; general ``Θ_Aᵀ (r, m)``, fan-in
    ``m`` (so the bound is ``1/√fan_in``) — and ``Θ_B = 0``, so ``ΔW = 0``.

    ``from_adapter``: warm start. ``Θ`` is the least-squares fit of every
    layer's factors of that module type at once (official ``A_l = Θ_A W0_lᵀ``,
    ``B_l = W0_l Θ_Bᵀ``; general ``A_l = Θ_Aᵀ W0_l``, ``B_l = W0_l Θ_B``),
    each ``B_l`` rescaled by ``s_l / s`` so ``s·B A`` matches the adapter's
    update; the relative residual per side is reported. ``rank`` defaults to
    the adapter's, ``targets`` to its module types.

    ``alpha`` defaults to ``rank`` (``s = 1``). Layout of the folder:
    :mod:`lora_lens.io.initfile`. ``compute.dtype`` is the compute dtype (the
    warm-start fit is a QR of the stacked layers: ask for float64 when its
    residual must be read below ~1e-6); files are float32. A default ``Θ`` is
    drawn from a generator seeded per module type (``compute.seed_for(type)``).
    """
    cx = as_compute(compute, **options)
    condlora_modes({}, mode)  # refuse an unknown mode before reading anything
    base = base if isinstance(base, BaseWeights) else open_base(base)
    adapter = None
    if from_adapter is not None:
        adapter = from_adapter if isinstance(from_adapter, Adapter) else load_adapter(from_adapter)
        adapter = replace(adapter, modules=tuple(m for m in adapter if m.layout in ("linear", "conv1d")))
    if targets is None:
        if adapter is None:
            raise ConfigError("no targets given; pass --targets (e.g. q_proj,v_proj) or --from ADAPTER to warm-start from.")
        targets = adapter.module_types
    layers = target_layers(base, targets)
    for mt, ls in layers.items():
        if len({layer.shape for layer in ls}) != 1:
            raise ShapeError(f"module type '{mt}' has layers of different shapes {sorted({x.shape for x in ls})}; "
                             "one shared Θ needs one shape. Target it separately or leave it out.")
    modes = condlora_modes({mt: ls[0].shape for mt, ls in layers.items()}, mode)  # per module type
    fitted = _adapter_by_type(adapter, base, layers) if adapter is not None else {}
    rank = _init_rank(rank, fitted, adapter)
    alpha = float(rank if alpha is None else alpha)
    dev, dt = cx.device, cx.dtype
    thetas, modules, records = {}, [], []
    for mt, ls in layers.items():
        m, n = ls[0].shape
        mode_t = modes[mt]
        if mt in fitted:
            tA, tB, fit = _fit_theta(fitted[mt], base, rank, alpha / rank, mode_t, dev, dt, rcond)
        else:
            gen = torch.Generator().manual_seed(cx.seed_for(mt))
            tA, tB, fit = (*condlora_theta_default(m, n, rank, mode_t, gen), None)
        thetas[f"{mt}.theta_A"], thetas[f"{mt}.theta_B"] = tA.float().cpu(), tB.float().cpu()
        for layer in ls:
            W0 = load_w0(base, layer.weight, layer.layout, layer.shape).to(dev, dt)  # (m, n)
            A, B = condlora_factors(tA.to(dev, dt), tB.to(dev, dt), W0, mode_t)
            modules.append(lora_module(layer, A.float().cpu(), B.float().cpu(), alpha))
        records.append({"module_type": mt, "mode": mode_t, "layers": len(ls), "shape": [m, n],
                        "theta_A": list(tA.shape),
                        "theta_B": list(tB.shape), "parameters": tA.numel() + tB.numel(),
                        "lora_parameters": len(ls) * rank * (m + n), "init": "warm_start" if fit else "kaiming_uniform",
                        "fan_in": None if fit else (n if mode_t == "official" else m), "fit": fit})
    mode = summary_mode(modes)
    params = {"mode": mode, "modes": modes, "seed": cx.seed, "from_adapter": str(adapter.path) if adapter else None,
              "init": "warm_start" if fitted else "theta_A kaiming_uniform(a=sqrt(5)), theta_B zeros"}
    sources = [str(base.path)] + ([str(adapter.path)] if adapter else [])
    desc = InitDescription(method="condlora", rank=rank, alpha=alpha, targets=list(layers), mode=mode, frozen=[],
                           peft_adapter="peft", theta_file=THETA_NAME, params=params, sources=sources)
    meta = provenance("condlora", params, sources)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_save_safetensors(thetas, tmp / THETA_NAME, meta)
        save_peft_adapter(tmp / "peft", modules, metadata=meta, base_model_name_or_path=str(base.path))
        write_init_description(tmp, desc)
    summary = {"parameters": sum(r["parameters"] for r in records),
               "lora_parameters": sum(r["lora_parameters"] for r in records), "modules": len(modules)}
    return InitResult(Path(out_dir), desc, tuple(records), summary)


def condlora_theta_default(m: int, n: int, rank: int, mode: str, generator: torch.Generator | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh ``Θ`` for a module type of shape ``(m, n)``: Kaiming-uniform ``Θ_A``, zero ``Θ_B`` (float32).

    ``torch.nn.init.kaiming_uniform_(a=√5)`` on the linear map ``Θ_A`` is, so
    the bound is ``1/√fan_in``: official ``Θ_A (r, n)`` is a ``Linear(n → r)``
    (fan-in ``n``); general ``Θ_Aᵀ (r, m)`` is a ``Linear(m → r)`` (fan-in
    ``m``), drawn as ``(r, m)`` and returned transposed ``(m, r)``. ``Θ_B = 0``
    makes ``B = 0``, so ``ΔW = 0`` at step 0.
    """
    if mode == "official":
        tA = torch.empty(rank, n)
        torch.nn.init.kaiming_uniform_(tA, a=math.sqrt(5), generator=generator)
        return tA, torch.zeros(rank, n)
    if mode != "general":
        raise ConfigError(f"unknown CondLoRA mode {mode!r}; expected one of {list(MODES)}.")
    tAT = torch.empty(rank, m)
    torch.nn.init.kaiming_uniform_(tAT, a=math.sqrt(5), generator=generator)
    return tAT.T.contiguous(), torch.zeros(n, rank)


def _adapter_by_type(adapter: Adapter, base: BaseWeights, layers) -> dict[str, list[tuple[TargetLayer, LoraModule]]]:
    """``{module type: [(base layer, adapter module), …]}`` for the targets the adapter covers."""
    by_weight = {layer.weight: (mt, layer) for mt, ls in layers.items() for layer in ls}
    weights = base.weight_names_for(adapter.names)
    mods = [m for m in adapter if weights[m.name] in by_weight]
    if not mods:
        raise ConfigError(f"{adapter.path}: has no LoRA module for the targets {list(layers)}; it covers "
                          f"{adapter.module_types}.")
    out: dict[str, list] = {}
    for m in mods:
        mt, layer = by_weight[weights[m.name]]
        if m.shape != layer.shape:
            raise ShapeError(f"adapter module '{m.name}' is {m.shape[0]}x{m.shape[1]} but base weight "
                             f"'{layer.weight}' is {layer.shape[0]}x{layer.shape[1]}; use the base it was trained on.")
        out.setdefault(mt, []).append((layer, m))
    return out


def _init_rank(rank: int | None, fitted: dict, adapter: Adapter | None) -> int:
    ranks = sorted({m.rank for pairs in fitted.values() for _, m in pairs})
    if rank is None:
        if not ranks:
            raise ConfigError("no rank given; pass rank (--rank R) or an adapter to warm-start from.")
        if len(ranks) > 1:
            raise ConfigError(f"{adapter.path}: its modules have ranks {ranks}; pass one rank (--rank R) to fit.")
        return ranks[0]
    if not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive integer; got {rank!r}.")
    if ranks and ranks != [rank]:
        raise ConfigError(f"rank {rank} differs from the adapter's rank(s) {ranks}; a warm start fits Θ to the "
                          "adapter's own factors: leave --rank out or match it.")
    return rank


@full_fp32
def _fit_theta(pairs, base, rank, s, mode, dev, dt, rcond) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Least-squares ``Θ`` over every layer of one module type, and the relative residual per side."""

    def systems():  # yields per layer: [(side(s), system (p, q), rhs (p, k))]
        for layer, m in pairs:
            W0 = load_w0(base, layer.weight, layer.layout, layer.shape).to(dev, dt)  # (m, n)
            At = m.A.to(dev, dt).T  # (n, r)
            Bs = m.B.to(dev, dt) * (m.scaling / s)  # (m, r): so s·B'A = s_l·B A
            if mode == "official":  # W0 [Θ_Aᵀ | Θ_Bᵀ] = [Aᵀ | B]
                yield [("AB", W0, torch.cat([At, Bs], -1))]
            else:  # W0ᵀ Θ_A = Aᵀ ; W0 Θ_B = B
                yield [("A", W0.T, At), ("B", W0, Bs)]

    keys = ["AB"] if mode == "official" else ["A", "B"]
    X = {k: stacked_lstsq(((M, Y) for per in systems() for kk, M, Y in per if kk == k), rcond=rcond, dtype=dt)
         for k in keys}
    num = {s: 0.0 for s in SIDES}
    den = {s: 0.0 for s in SIDES}
    for per in systems():  # second pass: the exact residual, one layer at a time
        for k, M, Y in per:
            E = M @ X[k] - Y
            cols = {"A": slice(0, rank), "B": slice(rank, 2 * rank)} if k == "AB" else {k: slice(None)}
            for side, c in cols.items():
                num[side] += float((E[:, c] ** 2).sum())
                den[side] += float((Y[:, c] ** 2).sum())
    fit = {"layers": [layer.key.block for layer, _ in pairs],
           **{f"residual_{s}": (num[s] / den[s]) ** 0.5 if den[s] > 0 else 0.0 for s in SIDES}}
    if mode == "official":
        tA, tB = X["AB"][:, :rank].T, X["AB"][:, rank:].T  # (r, n) each
    else:
        tA, tB = X["A"], X["B"]  # (m, r), (n, r)
    return tA.contiguous(), tB.contiguous(), fit
