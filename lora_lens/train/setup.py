"""Put a method's adapter layers into a model, with their starting values (docs/maths.md §5–8).

=============  ============================================  ===========================================
method         layers                                        start
=============  ============================================  ===========================================
lora           ``LoRALinear`` on each target                 ``B = 0``, ``A`` Kaiming (a=√5), as PEFT
lora-sp        same; :mod:`.masks` freezes half the update   same
chain          same; the loop merges and restarts links      same, and again at every knot
cora-frozen    ``LoRALinear``, ``B`` frozen                  ``B`` = basis (init folder or the base's
                                                             top-r left singular vectors), ``A = 0``
cora-init      ``LoRALinear``, ``B`` trainable               same
condlora       ``CondLoRALinear``; one ``CondTheta`` per     ``Θ`` from the init folder, or Kaiming
               module type, shared by all its layers         ``Θ_A`` and ``Θ_B = 0``
head-only      none: the base stays frozen, only the task's  the head's own init
               head trains (the control every table needs)
=============  ============================================  ===========================================

Every start gives ``ΔW = 0`` (``B = 0`` or ``A = 0``), so the model's output
is unchanged at step 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from ..keys import parse_module_path
from ..methods.condlora import condlora_modes, condlora_theta_default, summary_mode
from ..methods.cora import cora_default_alpha
from .config import DEFAULT_ALPHA, DEFAULT_RANK, TrainConfig
from .inits import (
    INIT_METHOD,
    CondLoraInit,
    CoraInit,
    cora_basis_from_base,
    read_init,
)
from .inject import find_targets, inject, is_adaptable
from .layers import CondLoRALinear, CondTheta, LoRALinear, base_shape, base_weight


@dataclass(frozen=True, eq=False)
class Adapted:
    """What :func:`adapt` put into the model."""

    layers: dict[str, nn.Module]  # module path → LoRALinear | CondLoRALinear
    thetas: dict[str, CondTheta]  # CondLoRA: module type → shared Θ
    rank: int
    alpha: float
    mode: str | None  # CondLoRA: official | general for every module type, or auto (see modes)
    init_source: str | None
    modes: dict[str, str] | None = None  # CondLoRA: module type → official | general (methods.condlora_modes)


def default_alpha(method: str, rank: int) -> float:
    """``α`` when neither ``--alpha`` nor an init folder gives one.

    Methods that take an init folder (``cora-*``, ``condlora``): ``α = r`` (``s = 1``,
    ``methods.cora.DEFAULT_SCALING``), what ``cora init`` and ``condlora init`` write, so a run
    started from the base and one started from a default init folder train at the same scale.
    The others: LoRA's ``α = 16`` (``s = 2`` at ``r = 8``).
    """
    return cora_default_alpha(rank) if method in INIT_METHOD else DEFAULT_ALPHA


def _pick(option, from_init, what: str, folder):
    if option is not None and from_init is not None and option != from_init:
        raise ConfigError(f"--{what} {option} disagrees with the init folder {folder} ({from_init}); drop --{what}.")
    return from_init if from_init is not None else option


def adapt(model: nn.Module, cfg: TrainConfig, init: str | Path | None, generator: torch.Generator) -> Adapted:
    """Inject ``cfg.method``'s layers into ``model`` (in place) and set their starting values."""
    method = cfg.method
    loaded = None
    if init is not None:
        adaptable = [p for p, m in model.named_modules() if p and is_adaptable(m)]
        loaded = read_init(init, method, adaptable)
    if method == "head-only":
        model.requires_grad_(False)  # the task unfreezes its head
        return Adapted({}, {}, 0, 0.0, None, None)
    rank = _pick(cfg.rank, loaded.rank if loaded else None, "rank", init) or DEFAULT_RANK
    alpha = _pick(cfg.alpha, loaded.alpha if loaded else None, "alpha", init) or default_alpha(method, rank)

    if method == "condlora":
        return _adapt_condlora(model, cfg, loaded, rank, alpha, generator)

    if isinstance(loaded, CoraInit):
        targets = [(p, model.get_submodule(p)) for p in loaded.B]
        if cfg.targets is not None and {p for p, _ in find_targets(model, cfg.targets)} != set(loaded.B):
            raise ConfigError(f"--targets {list(cfg.targets)} select other modules than the init folder {init}; "
                              "drop --targets.")
    else:
        targets = find_targets(model, cfg.targets)
    if method.startswith("cora"):
        basis = loaded.B if loaded else cora_basis_from_base({p: base_weight(m) for p, m in targets}, rank)

    layers = inject(model, targets, lambda path, module: LoRALinear(module, rank, alpha))
    for path, layer in layers.items():
        if method.startswith("cora"):
            B = basis[path]
            if tuple(B.shape) != tuple(layer.lora_B.shape):
                raise ShapeError(f"{init}: CoRA basis for '{path}' is {tuple(B.shape)}; the model needs "
                                 f"{tuple(layer.lora_B.shape)} (m, r). Re-create the init for this model.")
            layer.set_factors(torch.zeros_like(layer.lora_A), B)
            layer.lora_B.requires_grad_(method == "cora-init")
        else:
            layer.reset(generator)
    return Adapted(layers, {}, rank, alpha, None, str(init) if init else None)


def _adapt_condlora(model, cfg, loaded: CondLoraInit | None, rank, alpha, generator) -> Adapted:
    if loaded is not None:
        wanted = set(loaded.theta)
        targets = [(p, m) for p, m in model.named_modules() if p and is_adaptable(m)
                   and parse_module_path(p).module in wanted]
        missing = wanted - {parse_module_path(p).module for p, _ in targets}
        if missing:
            raise ConfigError(f"{loaded.source}: module types {sorted(missing)} are not in this model; "
                              "use an init made for this architecture.")
    else:
        targets = find_targets(model, cfg.targets)
    by_type: dict[str, list[tuple[str, nn.Module]]] = {}
    for p, m in targets:
        by_type.setdefault(parse_module_path(p).module, []).append((p, m))
    shapes = {}
    for t, group in by_type.items():
        s = {base_shape(m) for _, m in group}
        if len(s) != 1:
            raise ShapeError(f"module type '{t}' has W0 shapes {sorted(s)}; CondLoRA shares Θ across layers of one "
                             "shape. Target module types whose layers all have the same shape.")
        shapes[t] = s.pop()
    mode = _pick(cfg.condlora_mode, loaded.mode if loaded else None, "condlora-mode", loaded and loaded.source) or "auto"
    modes = condlora_modes(shapes, mode)  # per module type, as the init files and the analysis decide

    thetas = {}
    for t, (m, n) in shapes.items():
        theta = CondTheta(m, n, rank, modes[t])
        tA, tB = loaded.theta[t] if loaded else condlora_theta_default(m, n, rank, modes[t], generator)
        if tuple(tA.shape) != tuple(theta.theta_A.shape) or tuple(tB.shape) != tuple(theta.theta_B.shape):
            raise ShapeError(
                f"{loaded.source if loaded else 'CondLoRA'}: '{t}.theta_A' {tuple(tA.shape)} / '{t}.theta_B' "
                f"{tuple(tB.shape)}; {modes[t]} mode with W0 {m}x{n}, r={rank} needs {tuple(theta.theta_A.shape)} / "
                f"{tuple(theta.theta_B.shape)}."
            )
        theta.set_(tA, tB)
        thetas[t] = theta
    theta_of = {p: thetas[t] for t, group in by_type.items() for p, _ in group}
    layers = inject(model, targets, lambda path, module: CondLoRALinear(module, theta_of[path], alpha))
    return Adapted(layers, thetas, rank, alpha, summary_mode(modes), loaded.source if loaded else None, modes)
