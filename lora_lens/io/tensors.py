"""Lazy, safe tensor files: safetensors (single or sharded) and weights-only pickles.

A :class:`TensorStore` lists names, shapes and dtypes without reading tensor
data, and reads one tensor when asked (safetensors through ``safe_open``,
memory-mapped; ``.bin``/``.pt`` through ``torch.load(weights_only=True,
mmap=True)``). Tensors stay in their stored dtype until compute. Pickles are
never unpickled with arbitrary code: a file that needs more than plain tensors
is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError, NonFiniteError, ShapeError, UnsafeFileError
from ..types import TensorInfo
from .jsonfile import read_json
from .safetensors_header import read_safetensors_header
from .torchzip import check_torch_zip

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: Keys under which training scripts nest the real state dict.
NESTED_STATE_KEYS = ("model_state_dict", "state_dict", "model", "module")


def check_tensor(t: torch.Tensor, name: str, file: Path | str | None, require_float: bool = True) -> torch.Tensor:
    """Refuse integer tensors and NaN/Inf values, naming the file and tensor."""
    where = f"{file}: tensor '{name}'" if file else f"tensor '{name}'"
    if require_float and not (t.is_floating_point() or t.is_complex()):
        raise ShapeError(
            f"{where} has integer dtype {str(t.dtype).replace('torch.', '')}; expected a floating-point weight. "
            "Quantized checkpoints are not supported: dequantize the weights first."
        )
    if t.is_floating_point() and not _all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise NonFiniteError(
            f"{where} holds {bad} NaN/Inf value(s) of {t.numel()}; expected finite weights. "
            "The checkpoint is damaged or training diverged: use an earlier checkpoint."
        )
    return t


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one pass without a mask for the usual (finite) case.

    A sum is NaN or ±Inf whenever any term is, so a finite sum proves every
    term finite. A non-finite sum may also come from overflow of finite terms
    (|Σ| beyond the accumulator's range): only then is the element-wise test
    run. float16/bfloat16 are accumulated in float32, so float16's small
    range (65504) does not send every large tensor down the slow path.
    """
    acc = torch.float32 if t.element_size() < 4 else None
    if bool(torch.isfinite(t.sum(dtype=acc))):
        return True
    return bool(torch.isfinite(t).all())


class TensorStore:
    """Read-only view of named tensors in one or more files.

    ``infos()`` gives every tensor's name, shape and dtype without reading data;
    ``get(name)`` reads one tensor. Subclasses implement ``_read``.
    """

    path: Path
    format: str

    def __init__(self, path: Path, infos: Iterable[TensorInfo]):
        self.path = path
        self._infos: dict[str, TensorInfo] = {}
        for i in infos:
            if i.name in self._infos:  # two shards with one name: one would silently overwrite the other
                raise CheckpointError(
                    f"{path}: tensor '{i.name}' is in both {self._infos[i.name].file} and {i.file}; shards of one "
                    "checkpoint never repeat a name. These are different checkpoints: pass one file."
                )
            self._infos[i.name] = i

    def names(self) -> list[str]:
        return list(self._infos)

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{name}'; it holds {len(self._infos)} tensors such as {self.names()[:3]}.") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def get(self, name: str, validate: bool = True, require_float: bool = True) -> torch.Tensor:
        """Read one tensor (stored dtype); with ``validate`` refuse ints and NaN/Inf."""
        info = self.info(name)
        t = self._read(info)
        return check_tensor(t, name, info.file or self.path, require_float) if validate else t

    def _read(self, info: TensorInfo) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class SafetensorsStore(TensorStore):
    """One or several ``.safetensors`` files (several: the shards of one model)."""

    format = "safetensors"

    def __init__(self, path: Path, files: list[Path] | None = None):
        files = files or [path]
        self._handles = {}
        infos = []
        for f in files:
            handle = _open_safetensors(f)
            self._handles[f] = handle
            for k in handle.keys():
                sl = handle.get_slice(k)
                infos.append(TensorInfo(k, tuple(int(d) for d in sl.get_shape()), _st_dtype(sl.get_dtype()), f))
        super().__init__(path, infos)
        self.metadata = {} if len(files) != 1 else (self._handles[files[0]].metadata() or {})

    def _read(self, info: TensorInfo) -> torch.Tensor:
        try:
            return self._handles[info.file].get_tensor(info.name)
        except SafetensorError as e:  # pragma: no cover - validated at open
            raise CheckpointError(f"{info.file}: tensor '{info.name}' could not be read ({e}); the file is damaged.") from None


class PickleStore(TensorStore):
    """A ``torch.save`` state dict, loaded with ``weights_only=True`` (never arbitrary code)."""

    format = "pickle"

    def __init__(self, path: Path, files: list[Path] | None = None):
        files = files or [path]
        self._tensors: dict[str, tuple[Path, torch.Tensor]] = {}
        infos, self.metadata = [], {}
        for f in files:
            tensors, meta = _load_weights_only(f)
            self.metadata.update(meta)
            for k, t in tensors.items():
                self._tensors[k] = (f, t)
                infos.append(TensorInfo(k, tuple(t.shape), str(t.dtype).replace("torch.", ""), f))
        super().__init__(path, infos)

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._tensors[info.name][1]


def _st_dtype(name: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
            "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}.get(name, name.lower())


def _open_safetensors(path: Path):
    read_safetensors_header(path)  # sizes, offsets and keys checked before the library maps the file
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); it may be truncated or not a checkpoint. "
            "Re-download or re-save it."
        ) from None


class NpzStore(TensorStore):
    """A NumPy ``.npz`` archive (old MLX adapters), read by :func:`.npz.read_npz`: never unpickled."""

    format = "npz"

    def __init__(self, path: Path):
        from .npz import read_npz

        arrays = read_npz(path)
        self._tensors = {k: torch.from_numpy(a.astype(a.dtype.newbyteorder("="))) for k, a in arrays.items()}
        super().__init__(path, [TensorInfo(k, tuple(t.shape), str(t.dtype).replace("torch.", ""), path)
                                for k, t in self._tensors.items()])
        self.metadata = {}

    def _read(self, info: TensorInfo) -> torch.Tensor:
        return self._tensors[info.name]


def _load_weights_only(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """``torch.load(weights_only=True, mmap=True)`` of a checked zip-format ``torch.save`` file:
    (tensors, scalar metadata of a nested research dict)."""
    check_torch_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UnsafeFileError(
            f"{path}: refused: the pickle holds more than plain tensors ({first}). lora_lens only loads "
            "weights-only files and never runs code from a checkpoint; convert it to safetensors with trusted code."
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure of torch's parser on these bytes means a damaged file
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: not a readable PyTorch state dict ({type(e).__name__}: {first}); it may be truncated. "
            "Re-save it, preferably as safetensors."
        ) from None
    return _flatten_state_dict(obj, path)


def _flatten_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    if isinstance(obj, dict):
        for key in NESTED_STATE_KEYS:
            if isinstance(obj.get(key), dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
                return _flatten_state_dict(obj[key], path)
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors, {}
        # Research scripts nest: {"weights": {layer: {module: {A, B}}}, "metadata": {r, alpha}}.
        tensors, meta = {}, {}
        _walk(obj, "", tensors, meta)
        if tensors:
            return tensors, meta
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__} with no tensors at its top level; expected a state dict "
        f"(name → tensor), possibly nested under one of {list(NESTED_STATE_KEYS)}."
    )


def _walk(obj: dict, prefix: str, tensors: dict, meta: dict) -> None:
    """Flatten nested dicts of tensors to dotted names; scalars and strings become metadata."""
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[name.removeprefix("weights.")] = v
        elif isinstance(v, dict):
            _walk(v, name + ".", tensors, meta)
        elif isinstance(v, (int, float, str, bool)):
            meta[str(k)] = v


def factor_2d(t: torch.Tensor, role: str, name: str, file: Path | str) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A LoRA factor as 2-D, and the Conv2d kernel size it carried (``()`` for a matrix).

    Conv factors ``A (r, in, kh, kw)`` → ``(r, in·kh·kw)``, ``B (out, r, 1, 1)`` → ``(out, r)``.
    """
    if t.dim() == 2:
        return t, ()
    if t.dim() == 4 and (role == "A" or t.shape[2:] == (1, 1)):
        return t.reshape(t.shape[0], -1), tuple(int(k) for k in t.shape[2:])
    raise ShapeError(f"{file}: tensor '{name}' has shape {tuple(t.shape)}; expected a 2-D LoRA factor "
                     "(or a Conv2d factor: A (r, in, kh, kw), B (out, r, 1, 1)).")


def open_tensor_file(path: Path) -> TensorStore:
    """A single tensor file: ``.safetensors``, or a weights-only pickle (``.bin``/``.pt``/``.pth``)."""
    if path.suffix == ".safetensors":
        return SafetensorsStore(path)
    if path.suffix in PICKLE_SUFFIXES:
        return PickleStore(path)
    if path.suffix == ".npz":
        return NpzStore(path)
    raise CheckpointError(
        f"{path}: unknown file type '{path.suffix}'; expected .safetensors, .bin, .pt, .pth or .npz, or a model folder."
    )


def open_sharded(index_path: Path) -> TensorStore:
    """Shards listed by a ``*.index.json`` (``weight_map``: name → shard file)."""
    index = read_json(index_path, "a shard index (JSON with a 'weight_map')")
    try:
        weight_map = index["weight_map"]
        files = sorted({index_path.parent / f for f in weight_map.values()})
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"{index_path}: not a valid shard index ({type(e).__name__}: {e}); expected JSON with a 'weight_map'. "
            "Re-download the index file."
        ) from None
    odd = [f for f in weight_map.values() if Path(f).name != f or f in ("", ".", "..")]
    if odd:
        raise CheckpointError(f"{index_path}: weight_map names shard {odd[0]!r}; expected a file name in the same folder "
                              "(no path). Fix the index.")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path}: lists shard(s) {missing} that are not in {index_path.parent}; download the missing shards.")
    cls = SafetensorsStore if all(f.suffix == ".safetensors" for f in files) else PickleStore
    return cls(index_path, files)
