"""Base checkpoints: Hugging Face model folders, single files, sharded indexes.

``open_base(path)`` resolves what the path holds and returns a lazy
:class:`BaseWeights`; listing names/shapes reads no tensor data, ``get`` reads
one tensor. Accepted:

- a folder with ``model.safetensors``, sharded ``model-0000k-of-0000n.safetensors``
  + ``model.safetensors.index.json``, ``pytorch_model.bin`` (or its index);
- a single ``.safetensors`` file or a ``.bin``/``.pt`` state dict (a nested
  ``model_state_dict`` is tolerated).

Refused: adapters of any format, and a folder of several weight files that
neither an index nor shard names (``-0000k-of-0000n``) tie together.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import resolve_model
from ..errors import CheckpointError, LoraLensError
from ..keys import adapter_key_scheme, match_modules_to_weights, parse_module_path
from ..types import LayerKey, TensorInfo
from .atomic import register_input
from .files import missing
from .formats.detect import SHARD_NAME, refuse_several
from .jsonfile import read_json
from .tensors import PICKLE_SUFFIXES, PickleStore, SafetensorsStore, TensorStore, open_sharded, open_tensor_file

#: Input embeddings an output head can be tied to.
_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")

_FOLDER_CANDIDATES = (
    "model.safetensors.index.json", "model.safetensors",
    "pytorch_model.bin.index.json", "pytorch_model.bin",
)


@dataclass(frozen=True)
class WeightGroup:
    """Base weights of one module type: ``self_attn.q_proj`` in every block."""

    module: str
    tensors: tuple[TensorInfo, ...]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return list(dict.fromkeys(t.shape for t in self.tensors))


class BaseWeights:
    """A lazily read base checkpoint.

    >>> base = open_base("path/to/model")            # doctest: +SKIP
    >>> base.info("model.layers.0.self_attn.q_proj.weight").shape   # no data read
    >>> W = base.get("model.layers.0.self_attn.q_proj.weight")       # one tensor
    """

    def __init__(self, path: Path, store: TensorStore):
        self.path = path
        self.store = store

    @property
    def format(self) -> str:
        return self.store.format

    def names(self) -> list[str]:
        return self.store.names()

    def infos(self) -> list[TensorInfo]:
        return self.store.infos()

    def info(self, name: str) -> TensorInfo:
        return self.store.info(name)

    def get(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype; NaN/Inf and integer dtypes refused."""
        return self.store.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def matrices(self) -> list[TensorInfo]:
        """2-D ``*.weight`` tensors: the candidates for LoRA targets."""
        return [i for i in self.infos() if len(i.shape) == 2 and i.name.endswith(".weight")]

    def groups(self) -> list[WeightGroup]:
        """2-D weights grouped by module type (block index removed), in file order."""
        groups: dict[str, list[TensorInfo]] = OrderedDict()
        for info in self.matrices():
            key = parse_module_path(info.name[: -len(".weight")])
            groups.setdefault(key.module, []).append(info)
        return [WeightGroup(m, tuple(v)) for m, v in groups.items()]

    def weight_names_for(self, module_names: list[str]) -> dict[str, str]:
        """Map adapter module paths to this checkpoint's weight names (prefixes bridged).

        A tied output head (``lm_head`` with ``tie_word_embeddings``, which the
        checkpoint stores only as the input embedding) maps to the embedding.
        """
        tied = self._tied_head()
        names = self.names() + [f"{head}.weight" for head in tied]
        found = match_modules_to_weights(module_names, names, source=f"base checkpoint {self.path}")
        return {m: tied.get(w.removesuffix(".weight"), w) for m, w in found.items()}

    def _tied_head(self) -> dict[str, str]:
        """``{"lm_head": "<embedding>.weight"}`` when the head is tied and not stored, else ``{}``."""
        config = (self.path if self.path.is_dir() else self.path.parent) / "config.json"
        if "lm_head.weight" in self.store or not config.is_file():
            return {}
        try:
            tie = read_json(config, "a model config.json").get("tie_word_embeddings", True)  # transformers' default
        except (LoraLensError, AttributeError):  # an unreadable config only loses the tied-head pairing
            return {}
        emb = [n for n in self.names() if n.endswith(_EMBEDDING_SUFFIXES)]
        return {"lm_head": emb[0]} if tie and len(emb) == 1 else {}

    def layer_key(self, weight_name: str) -> LayerKey:
        return parse_module_path(weight_name.removesuffix(".weight"))

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self.infos())

    @property
    def num_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos())


# --base and cora's --source take full checkpoints; the hint must fit both (cora basis has no ADAPTER).
_WHERE_ADAPTERS_GO = ("Pass an adapter where a command takes ADAPTER; --base (and cora's --source) take full model "
                      "checkpoints, such as the model the adapter was trained on.")


def open_base(path: str | Path) -> BaseWeights:
    """Open a base checkpoint lazily; see the module docstring for what is accepted.

    Anything that looks like an adapter (an adapter config, an MLX folder, or
    tensor names of any LoRA/LoKr/LoHa format) is refused: never read as a base.
    A bundled model's name (``stories260K``, :mod:`lora_lens.data`) names its folder when no such path exists.
    """
    path = Path(resolve_model(path))
    if not path.exists():
        raise CheckpointError(f"{path}: {missing(path)}; expected a model folder or a .safetensors/.bin file.")
    register_input(path)
    if path.is_dir():
        store = _open_folder(path)
    elif path.name.endswith(".index.json"):
        store = open_sharded(path)
    else:
        store = open_tensor_file(path)
    scheme = adapter_key_scheme(store.names())
    if scheme is not None:
        what = scheme.split(":", 1)[1] + " adapter (not low-rank)" if ":" in scheme else f"{scheme} LoRA adapter"
        raise CheckpointError(
            f"{path}: holds a {what} (its tensor names are adapter factors such as "
            f"'{next(n for n in store.names() if adapter_key_scheme([n]) is not None or 'lora' in n.lower())}'), "
            f"not a base model. {_WHERE_ADAPTERS_GO}"
        )
    return BaseWeights(path, store)


def _open_folder(folder: Path) -> TensorStore:
    for marker in ("adapter_config.json", "adapters.safetensors", "adapters.npz"):
        if (folder / marker).exists():
            raise CheckpointError(
                f"{folder}: is an adapter folder ({marker}); expected a base model. {_WHERE_ADAPTERS_GO}"
            )
    for name in _FOLDER_CANDIDATES:
        p = folder / name
        if p.is_file():
            return open_sharded(p) if name.endswith(".index.json") else open_tensor_file(p)
    singles = sorted(folder.glob("*.safetensors")) or sorted(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}"))
    if len(singles) == 1:
        return open_tensor_file(singles[0])
    if len(singles) > 1:
        if not all(SHARD_NAME.match(p.name) for p in singles):
            raise refuse_several(folder, singles)
        # Shards named model-0000N-of-0000M without their index: one model.
        cls = SafetensorsStore if singles[0].suffix == ".safetensors" else PickleStore
        return cls(folder, singles)
    listing = sorted(p.name for p in folder.iterdir())[:8]
    what = "is empty" if not listing else f"holds no weights file (found {listing})"
    raise CheckpointError(
        f"{folder}: {what}; expected model.safetensors, a sharded model-*.safetensors with its index, "
        "or pytorch_model.bin."
    )
