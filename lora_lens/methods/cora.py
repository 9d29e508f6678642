"""CoRA (Xiao et al., 2024): a common subspace from model weights as LoRA's B (docs/maths.md §6).

Per module type and layer, the sources' weights are stacked side by side,
``S = [W_1 | … | W_M] (m, M·n)`` (PyTorch layout; Conv1D transposed), and the
top-``r`` left singular vectors of ``S`` are the basis ``B (m, r)``. With
``source_kind="deltas"`` the stacked matrices are ``W_k − W_base``. With
``share_across_layers`` every layer of the module type is stacked too, giving
one basis per module type.

How the top-r subspace is computed, and why:

- per layer: the randomized range finder (:func:`~lora_lens.linalg.randomized_svd`)
  on the stacked matrix, batched over the layers of one shape, with
  oversampling 16 and **16** power iterations. Real weights have flat spectra
  (MiniLM q/k/v: ``σ_r / σ_{r+1}`` = 1.001–1.01), so the 4 iterations that
  suffice for singular *values* leave the *subspace* at φ = 0.93–0.97 against
  the exact SVD; 16 iterations give φ > 0.99999 there, at
  ``≈ 34 · 2·m·(M·n)·(r+16)`` flops instead of a full SVD's ``O(m²·M·n)``
  (measured in benchmarks/bench_inits.py).
- shared across layers: the stacked matrix would be ``(m, L·M·n)``, so it is
  never formed; the Gram matrix ``G = Σ_{l,k} W W ᵀ (m, m)`` is accumulated one
  layer at a time (memory ``m²``) and its top-``r`` eigenvectors — the same
  left singular vectors — found by the same range finder on ``G``.

The basis is orthonormal (``scale="orthonormal"``) or rescaled to the Frobenius
norm of a Kaiming-uniform (a = √5) ``B (m, r)`` with fan-in ``r``:
``‖B‖_F = √(m/3)`` (``scale="kaiming"``). ``A`` starts at zero, so the output
is unchanged at init while ``A`` still gets gradient.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..chunks import chunks, load_w0, stack
from ..compute import Compute, as_compute
from ..errors import ConfigError, ShapeError
from ..io.atomic import atomic_directory, atomic_save_safetensors, atomic_write_json
from ..io.base import BaseWeights, open_base
from ..io.initfile import InitDescription, write_init_description
from ..io.peft import save_peft_adapter
from ..jsonable import stamp
from ..keys import match_modules_to_weights, parse_module_path
from ..linalg import top_left_subspace  # noqa: F401  (CoRA's kernel; lives in linalg so compare can share it)
from ..types import LoraModule
from .result import InitResult, provenance
from .targets import TargetLayer, check_rank, lora_module, target_layers

SOURCE_KINDS = ("weights", "deltas")
SCALES = ("orthonormal", "kaiming")
MODES = ("frozen", "init")
BASIS_FILE = "cora_basis.safetensors"
BASIS_JSON = "cora_basis.json"

#: CoRA's default scaling ``s = α / r`` (not B's ``scale``, see :data:`SCALES`): 1, i.e. ``α = r``.
#: B is an orthonormal basis, so ``‖ΔW‖_F = s·‖A‖_F``; ``cora init`` and ``train --method cora-*``
#: without an init folder both use it (LoRA's trainer default α = 16 at r = 8 would give s = 2).
DEFAULT_SCALING = 1.0


def cora_default_alpha(rank: int) -> float:
    """``α`` for ``rank`` when none is given: ``DEFAULT_SCALING · rank`` (``s = 1``)."""
    return DEFAULT_SCALING * rank


@dataclass(frozen=True, eq=False)
class CoraBasis:
    """Common-subspace bases: ``bases[key] (m, r)`` (scaled as asked), ``singular_values[key] (r,)``.

    ``key`` is a layer's module path, or the module type when ``shared``.
    ``energy[key]``: ``Σ_{i≤r} σ_i² / ‖S‖_F²``, the share of the stacked
    matrix's energy the basis captures.
    """

    rank: int
    layers: "OrderedDict[str, list[TargetLayer]]"
    bases: dict[str, torch.Tensor]
    singular_values: dict[str, torch.Tensor]
    energy: dict[str, float]
    shared: bool
    params: dict = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def key_for(self, module_type: str, layer: TargetLayer) -> str:
        return module_type if self.shared else layer.module

    def basis_for(self, module_type: str, layer: TargetLayer) -> torch.Tensor:
        """The ``(m, r)`` basis that layer's B gets."""
        return self.bases[self.key_for(module_type, layer)]

    def to_dict(self) -> dict:
        # reshaped: one entry per distinct basis (shared ones once), without the (m, r) tensors themselves
        entries = []
        for mt, ls in self.layers.items():
            for key in dict.fromkeys(self.key_for(mt, x) for x in ls):
                entries.append({"key": key, "module_type": mt, "shape": list(self.bases[key].shape),
                                "singular_values": self.singular_values[key].tolist(), "energy": self.energy[key]})
        return stamp("cora_basis", {"rank": self.rank, "shared": self.shared, "targets": list(self.layers),
                                    "params": self.params, "sources": list(self.sources), "bases": entries})


#: CoRA's defaults for the range finder (16 iterations: see the module docstring) and the device bytes one
#: stacked ``(m, n)`` layer costs per source (input, the finder's workspace, factors), in compute-dtype elements.
CORA_OVERSAMPLE, CORA_N_ITER, CORA_BYTES_PER_ITEM = 16, 16, 3


def cora_basis(
    base: BaseWeights | str | Path,
    rank: int,
    targets: str | Sequence[str],
    sources: Sequence[BaseWeights | str | Path] = (),
    *,
    share_across_layers: bool = False,
    source_kind: str = "weights",
    scale: str = "orthonormal",
    oversample: int = CORA_OVERSAMPLE,
    n_iter: int = CORA_N_ITER,
    compute: Compute | None = None,
    **options,
) -> CoraBasis:
    """Top-``r`` common subspaces of the targets' weights (see the module docstring).

    ``source_kind="weights"``: the stacked matrices are ``[W_base | W_1 | …]``
    (the base alone when ``sources`` is empty). ``"deltas"``: ``[W_1 − W_base |
    …]``, at least one source needed. Sources must share the base's
    architecture (names are matched across ``bert.``/``model.`` prefixes).
    ``compute.max_memory`` bytes bound one chunk of layers; each layer's
    random sketch is seeded from its module path (a shared basis: from the
    module type), so the numbers do not depend on the chunking.
    """
    if source_kind not in SOURCE_KINDS:
        raise ConfigError(f"unknown source kind {source_kind!r}; expected one of {list(SOURCE_KINDS)}.")
    if scale not in SCALES:
        raise ConfigError(f"unknown basis scale {scale!r}; expected one of {list(SCALES)}.")
    base = base if isinstance(base, BaseWeights) else open_base(base)
    srcs = [s if isinstance(s, BaseWeights) else open_base(s) for s in sources]
    if source_kind == "deltas" and not srcs:
        raise ConfigError("source kind 'deltas' needs at least one fine-tuned source (--source DIR) besides --base.")
    layers = target_layers(base, targets)
    check_rank(rank, layers, limit="m")
    cx = as_compute(compute, **options)
    names = [_source_names(base, s, layers) for s in srcs]
    M = len(srcs) if source_kind == "deltas" else len(srcs) + 1

    def stacked(chunk: list[TargetLayer]) -> torch.Tensor:
        """``(c, m, M·n)``: each layer's sources side by side."""
        W0 = stack(cx, chunk, lambda x: load_w0(base, x.weight, x.layout, x.shape))  # (c, m, n)
        parts = [] if source_kind == "deltas" else [W0]
        for s, nm in zip(srcs, names):
            Ws = stack(cx, chunk, lambda x: load_w0(s, nm[x.weight], x.layout, x.shape))  # (c, m, n)
            parts.append(Ws - W0 if source_kind == "deltas" else Ws)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    for mt, ls in layers.items():
        if share_across_layers and len({x.shape[0] for x in ls}) != 1:
            raise ShapeError(f"module type '{mt}' has layers with different output sizes; "
                             "share_across_layers needs one (m, r) basis for all of them.")
    bases, svals, energy = {}, {}, {}
    gram: dict[str, torch.Tensor] = {}  # shared: G = Σ_{l,k} W Wᵀ (m, m) per module type
    flat = [(mt, x) for mt, ls in layers.items() for x in ls]
    for (mt, (m, n)), run in chunks(flat, lambda t: (t[0], t[1].shape),
                                    lambda key: CORA_BYTES_PER_ITEM * M * key[1][0] * key[1][1] * cx.itemsize, cx,
                                    lambda key: key[0]):
        chunk = [x for _, x in run]
        S = stacked(chunk)  # (c, m, M·n)
        if share_across_layers:
            G = gram.setdefault(mt, torch.zeros(m, m, device=cx.device, dtype=cx.dtype))
            for Sc in S:  # G += S_c S_cᵀ (m, m), one layer at a time: the same sum order for any chunking
                G.addmm_(Sc, Sc.T)
        else:
            # one sketch per layer, seeded by its module path: the same basis for any max_memory
            U, sv = top_left_subspace(S, rank, oversample, n_iter, seed=cx.seeds_for([x.module for x in chunk]))
            frob2 = torch.linalg.matrix_norm(S).double() ** 2  # (c,), without a float64 copy of S
            for j, x in enumerate(chunk):
                bases[x.module] = _scaled(U[j], scale).cpu()
                svals[x.module] = sv[j].double().cpu()
                energy[x.module] = float((sv[j].double() ** 2).sum() / frob2[j]) if frob2[j] > 0 else 0.0
        del S
    for mt, G in gram.items():
        U, lam = top_left_subspace(G, rank, oversample, n_iter, seed=cx.seed_for(mt))  # eigenvalues of G = σ² of the stack
        bases[mt] = _scaled(U, scale).cpu()
        svals[mt] = lam.clamp_min(0).sqrt().double().cpu()
        tr = float(torch.diagonal(G).double().sum())
        energy[mt] = float(lam.double().sum()) / tr if tr > 0 else 0.0
    params = {"share_across_layers": share_across_layers, "source_kind": source_kind, "scale": scale,
              "oversample": oversample, "n_iter": n_iter, "seed": cx.seed, "stacked_sources": M}
    return CoraBasis(rank, layers, bases, svals, energy, share_across_layers, params,
                     tuple(str(x.path) for x in [base, *srcs]))


def _scaled(U: torch.Tensor, scale: str) -> torch.Tensor:
    """Orthonormal ``U (m, r)``, or scaled to a Kaiming-uniform B's Frobenius norm ``√(m/3)``."""
    if scale == "orthonormal":
        return U
    m, r = U.shape
    return U * (m / (3.0 * r)) ** 0.5


def _source_names(base: BaseWeights, src: BaseWeights, layers) -> dict[str, str]:
    """``{base weight name: source weight name}``, shapes checked."""
    modules = [x.module for ls in layers.values() for x in ls]
    found = match_modules_to_weights(modules, src.names(), source=f"source checkpoint {src.path}")
    out = {}
    for ls in layers.values():
        for x in ls:
            name = found[x.module]
            if tuple(src.info(name).shape) != tuple(base.info(x.weight).shape):
                raise ShapeError(f"{src.path}: '{name}' is {tuple(src.info(name).shape)} but the base's '{x.weight}' is "
                                 f"{tuple(base.info(x.weight).shape)}; CoRA sources must share the base's architecture.")
            out[x.weight] = name
    return out


def write_cora_basis(basis: CoraBasis, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``cora_basis.safetensors`` (``<key>.basis (m, r)``, ``<key>.singular_values (r,)``) and ``cora_basis.json``."""
    tensors = {}
    for key, B in basis.bases.items():
        tensors[f"{key}.basis"] = B.float()
        tensors[f"{key}.singular_values"] = basis.singular_values[key].float()
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        atomic_save_safetensors(tensors, tmp / BASIS_FILE, provenance("cora", basis.params, basis.sources))
        atomic_write_json(tmp / BASIS_JSON, basis.to_dict())
    return Path(out_dir)


def cora_init(
    base: BaseWeights | str | Path,
    rank: int,
    targets: str | Sequence[str],
    sources: Sequence[BaseWeights | str | Path] = (),
    *,
    out_dir: str | Path,
    mode: str = "init",
    alpha: float | None = None,
    overwrite: bool = False,
    **basis_options,
) -> InitResult:
    """Write a CoRA init folder: a PEFT adapter with ``lora_B`` = the common basis and ``lora_A = 0``.

    ``mode="frozen"``: the trainer keeps B fixed (``frozen = ["lora_B"]`` in
    ``lora_lens_init.json``); ``"init"``: B is trainable. ``alpha`` defaults to
    ``rank`` (``s = 1``, :data:`DEFAULT_SCALING`, as the trainer's own CoRA basis). ``basis_options`` go to :func:`cora_basis`. The
    model's output is unchanged at init since ``A = 0``.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown CoRA mode {mode!r}; expected one of {list(MODES)}.")
    basis = cora_basis(base, rank, targets, sources, **basis_options)
    alpha = float(cora_default_alpha(rank) if alpha is None else alpha)
    modules, records = [], []
    for mt, ls in basis.layers.items():
        for x in ls:
            B = basis.basis_for(mt, x).float().clone()  # (m, r); a shared basis is copied per layer for safetensors
            modules.append(lora_module(x, torch.zeros(rank, x.shape[1]), B, alpha))
        for key in dict.fromkeys(basis.key_for(mt, x) for x in ls):
            records.append({"key": key, "module_type": mt, "energy": basis.energy[key],
                            "sigma_first": float(basis.singular_values[key][0]),
                            "sigma_last": float(basis.singular_values[key][-1])})
    params = {"mode": mode, **basis.params}
    desc = InitDescription(method="cora", rank=rank, alpha=alpha, targets=list(basis.layers), mode=mode,
                           frozen=["lora_B"] if mode == "frozen" else [], peft_adapter=".", params=params,
                           sources=list(basis.sources))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_peft_adapter(tmp, modules, metadata=provenance("cora", params, basis.sources),
                          base_model_name_or_path=basis.sources[0], overwrite=True)
        write_init_description(tmp, desc)
    summary = {"modules": len(modules), "trainable_parameters": sum(
        m.A.numel() + (0 if mode == "frozen" else m.B.numel()) for m in modules)}
    return InitResult(Path(out_dir), desc, tuple(records), summary)


def collection_cora_init(
    collection,
    out_dir: str | Path,
    *,
    mode: str = "init",
    alpha: float | None = None,
    overwrite: bool = False,
) -> InitResult:
    """A CoRA init folder from a collection's shared basis (:mod:`lora_lens.compare.collection`).

    Per module: ``lora_B`` = the collection's top-``R`` left basis ``U_R (m, R)``
    (orthonormal), ``lora_A = 0``, so a new adapter trains in the subspace the
    collection's adapters share (``mode="frozen"`` keeps B fixed). The run must
    have kept the bases (``CollectionSettings(keep_basis=True)``). Modules whose
    shared rank differs (a rank clipped by a small module) go to ``rank_pattern``.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown CoRA mode {mode!r}; expected one of {list(MODES)}.")
    missing = [m.name for m in collection.modules if m.basis_left is None]
    if missing:
        raise ConfigError(f"the collection was computed without its bases (e.g. module '{missing[0]}'); "
                          "rerun with keep_basis=True (the CLI's --write-basis does).")
    modules, records = [], []
    for m in collection.modules:
        B = m.basis_left.float().contiguous()  # (m, R)
        R = int(B.shape[1])
        a = float(cora_default_alpha(R) if alpha is None else alpha)
        key = parse_module_path(m.module_path)
        modules.append(LoraModule(m.module_path, key, torch.zeros(R, m.shape[1]), B, alpha=a, scaling=a / R,
                                  layout=m.layout))
        records.append({"key": m.module_path, "module_type": m.module_type, "rank": R,
                        "energy": float(m.energy_left[:, R - 1].mean()),
                        "sigma_first": float(m.sv_left[0]), "sigma_last": float(m.sv_left[R - 1])})
    rank = max(x.rank for x in modules)
    params = {"mode": mode, "source_kind": "collection", "scale": "orthonormal",
              "shared_rank": collection.settings.shared_rank, "adapters": len(collection.labels)}
    a0 = float(cora_default_alpha(rank) if alpha is None else alpha)
    desc = InitDescription(method="cora", rank=rank, alpha=a0,
                           targets=list(dict.fromkeys(m.module_type for m in collection.modules)), mode=mode,
                           frozen=["lora_B"] if mode == "frozen" else [], peft_adapter=".", params=params,
                           sources=list(collection.paths))
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_peft_adapter(tmp, modules, metadata=provenance("cora", params, collection.paths), overwrite=True)
        write_init_description(tmp, desc)
    summary = {"modules": len(modules), "trainable_parameters": sum(
        x.A.numel() + (0 if mode == "frozen" else x.B.numel()) for x in modules)}
    return InitResult(Path(out_dir), desc, tuple(records), summary)
