"""Where CoRA's B and CondLoRA's Θ come from: an init folder, or a stand-in computed from the base.

Init folders follow :mod:`lora_lens.io.initfile` (the contract with
``lora-lens cora init`` / ``condlora init``):

- CoRA: ``lora_lens_init.json`` (method ``cora``) + a PEFT adapter (at
  ``peft_adapter``, ``"."`` by default) whose ``lora_B`` is the basis. The
  trainer takes ``B``, ``r`` and ``alpha`` from it; ``A`` always starts at 0.
- CondLoRA: ``lora_lens_init.json`` (method ``condlora``, mode
  ``auto | official | general``, decided per module type by
  :func:`lora_lens.methods.condlora.condlora_modes`; targets = module types) + ``condlora_theta.safetensors``
  with ``"<module type>.theta_A"`` / ``".theta_B"``.

Without an init folder the trainer computes them from the base with the
methods package's own kernels (the functions at the end of this file), so a
trainer-computed init equals what the init commands write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..chunks import chunks, stack
from ..compute import Compute, as_compute
from ..errors import ConfigError, ShapeError
from ..io import INIT_NAME, THETA_NAME, load_adapter, open_tensor_file, read_init_description
from ..keys import match_modules_to_weights
from ..methods.condlora import REQUESTS
from ..methods.cora import CORA_BYTES_PER_ITEM, CORA_N_ITER, CORA_OVERSAMPLE, top_left_subspace

#: The trainer's method → the init-folder method it accepts.
INIT_METHOD = {"cora-frozen": "cora", "cora-init": "cora", "condlora": "condlora"}


@dataclass(frozen=True, eq=False)
class CoraInit:
    """CoRA's basis per module path: ``B (m, r)``; ``A`` starts at zero."""

    rank: int
    alpha: float
    B: dict[str, torch.Tensor]
    mode: str | None
    source: str


@dataclass(frozen=True, eq=False)
class CondLoraInit:
    """CondLoRA's shared pairs per module type: ``{type: (theta_A, theta_B)}``."""

    rank: int
    alpha: float
    mode: str
    theta: dict[str, tuple[torch.Tensor, torch.Tensor]]
    source: str


def read_init(folder: str | Path, method: str, module_paths: list[str]) -> CoraInit | CondLoraInit:
    """Read an init folder for ``method``; refuse one written for another method.

    ``module_paths``: the model's adaptable module paths, to which a CoRA
    init's module names are matched (exactly, or with backbone prefixes such as
    ``model.`` / ``bert.`` bridged).
    """
    folder = Path(folder)
    if method not in INIT_METHOD:
        raise ConfigError(f"--method {method} takes no --init folder; only {sorted(INIT_METHOD)} do.")
    desc = read_init_description(folder)
    if desc.method != INIT_METHOD[method]:
        raise ConfigError(
            f"{folder}: is a '{desc.method}' init folder; --method {method} needs one written by "
            f"'lora-lens {INIT_METHOD[method]} init'."
        )
    if desc.method == "cora":
        adapter = load_adapter(folder / (desc.peft_adapter or "."))
        match = match_modules_to_weights(
            adapter.names, [p + ".weight" for p in module_paths], source=f"model (for the init {folder})"
        )
        ranks, scalings = {m.rank for m in adapter}, {m.scaling for m in adapter}
        if ranks != {desc.rank} or len(scalings) != 1:
            raise ConfigError(
                f"{folder}: CoRA init modules have ranks {sorted(ranks)} and scalings {sorted(scalings)}; expected "
                f"rank {desc.rank} (from {INIT_NAME}) and one scaling everywhere. Re-create the init folder."
            )
        B = {match[m.name][: -len(".weight")]: m.B.float() for m in adapter}
        return CoraInit(desc.rank, scalings.pop() * desc.rank, B, desc.mode, str(folder))

    if desc.mode not in REQUESTS:
        raise ConfigError(f"{folder}: CondLoRA mode {desc.mode!r}; expected one of {list(REQUESTS)}.")
    store = open_tensor_file(folder / (desc.theta_file or THETA_NAME))
    missing = [f"{t}.theta_{x}" for t in desc.targets for x in "AB" if f"{t}.theta_{x}" not in store]
    if missing:
        raise ShapeError(f"{store.path}: missing {missing}; the JSON's targets are {desc.targets}. Re-create the init.")
    theta = {t: (store.get(f"{t}.theta_A").float(), store.get(f"{t}.theta_B").float()) for t in desc.targets}
    return CondLoraInit(desc.rank, desc.alpha, desc.mode, theta, str(folder))


# --------------------------------------------------------------------------- INITS FROM THE BASE
# Used when no --init folder is given: the methods package's own kernels, so a
# trainer-computed init equals what `lora-lens cora init` / `condlora init` write.


def cora_basis_from_base(weights: dict[str, torch.Tensor], rank: int, device: str | torch.device | None = None,
                         compute: Compute | None = None) -> dict[str, torch.Tensor]:
    """CoRA's common basis from the one base alone (docs/maths.md §6, M = 1 source).

    For each layer's ``W0 (m, n)``: ``B = U_r``, its top-r left singular
    vectors ``(m, r)`` (orthonormal, signs fixed), computed as
    :func:`lora_lens.methods.cora.cora_basis` does for a base file: the same
    chunk iterator and memory budget (:func:`lora_lens.chunks.chunks`), the
    same kernel (:func:`lora_lens.methods.cora.top_left_subspace`, CoRA's
    oversampling and iterations) and each layer's sketch seeded from its
    module path (``compute.seed``, 0 by default) — so the trainer's basis is
    the one ``lora-lens cora init`` writes for the same weights. ``device``
    (given) overrides ``compute``'s; neither given: the CPU.
    """
    small = [f"{p} {tuple(W.shape)}" for p, W in weights.items() if min(W.shape) < rank]
    if small:
        raise ConfigError(f"rank {rank} exceeds min(m, n) of {small[:3]}; lower --rank.")
    # a default device would override an explicit compute's: None keeps it
    cx = as_compute(compute, device=device if compute is not None or device is not None else "cpu")
    out = {}
    for (m, n), names in chunks(list(weights), lambda p: tuple(weights[p].shape),
                                lambda mn: CORA_BYTES_PER_ITEM * mn[0] * mn[1] * cx.itemsize, cx):
        S = stack(cx, names, lambda p: weights[p].detach())  # (c, m, n) in the compute dtype
        U, _ = top_left_subspace(S, rank, CORA_OVERSAMPLE, CORA_N_ITER, seed=cx.seeds_for(names))
        out.update({p: U[i].cpu().contiguous() for i, p in enumerate(names)})
    return {p: out[p] for p in weights}
