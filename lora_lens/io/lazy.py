"""One adapter's modules listed without reading them, and read one module at a time.

A collection of hundreds of adapters is never held in memory: the compare
stage asks for one module across all files (:mod:`lora_lens.compare.collection`),
so each file must list its modules (names, shapes, ranks, scaling) from its
header and hand out one module's factors on demand.

- PEFT folders with ``adapter_model.safetensors``: the header and
  ``adapter_config.json`` only; ``read(name)`` reads the two factors of that
  module (``safe_open``, memory-mapped). Same layout, scaling and checks as
  :func:`~lora_lens.io.peft.load_adapter` (a test compares every module).
- Anything else :func:`~lora_lens.io.formats.load_adapter` reads (``.bin``,
  MLX, kohya, diffusers, LyCORIS, research state dicts; detected): loaded whole
  once and kept, so such collections cost the memory of the adapters opened at once.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ShapeError
from ..keys import parse_module_path, parse_peft_key
from ..types import Adapter, LayerKey, LoraModule
from .formats import load_adapter
from .peft import CONFIG_NAME, _written_layouts, find_adapters, lora_scaling, rank_and_alpha, read_settings
from .tensors import SafetensorsStore, check_tensor, open_tensor_file


@dataclass(frozen=True)
class ModuleRef:
    """What a module is, known from the header: ``ΔW (m, n) = scaling · B (m, r) A (r, n)``."""

    name: str
    key: LayerKey
    shape: tuple[int, int]
    rank: int
    alpha: float
    scaling: float
    layout: str


class AdapterIndex:
    """The modules of one adapter (``refs`` in layer order) and a reader for one at a time."""

    def __init__(self, path: Path, label: str, refs: dict[str, ModuleRef], reader, flags: tuple[str, ...] = ()):
        self.path = path
        self.label = label
        self.refs = refs
        self._reader = reader
        self.flags = flags

    def read(self, name: str) -> LoraModule:
        """One module's factors (stored dtype)."""
        if name not in self.refs:
            raise CheckpointError(f"{self.path}: has no LoRA module '{name}'.")
        return self._reader(name)


def index_adapter(path: str | Path) -> AdapterIndex:
    """List an adapter's modules; read lazily where the format allows (see the module docstring)."""
    path = Path(path)
    found = find_adapters(path) if path.exists() and (path / CONFIG_NAME).is_file() else []
    wfile = found[0][1] / "adapter_model.safetensors" if found and found[0][0] is None else None
    if wfile is None or not wfile.is_file():
        return _eager(load_adapter(path))
    return _lazy_peft(found[0][1], wfile)


@functools.lru_cache(maxsize=1024)
def cached_index(path: str, stamp: tuple) -> AdapterIndex:
    """:func:`index_adapter` kept per process (workers reuse headers across module tasks); keyed by
    ``stamp`` (:func:`index_once`), so a changed file is a new key."""
    return index_adapter(path)


def index_once(path: str | Path) -> AdapterIndex:
    """:func:`cached_index` of ``path``, keyed by its absolute path and ``(name, mtime_ns, size, inode)`` of
    it and, for a folder, of every file directly in it (a weights file rewritten in place does not touch the
    folder's stamp; any of its files may be the one a format reads). Every stamp, not the newest one: a file
    replaced by an older copy (``rsync -a``, ``cp -p``) keeps the newest mtime unchanged, and a rewrite within
    the filesystem's timestamp granularity keeps its own, but not its size or inode."""
    if not os.path.exists(path):
        return index_adapter(path)  # its own error, naming the path as given
    path = os.path.abspath(path)

    def stamp(e: os.DirEntry | str) -> tuple:
        st = os.stat(e)
        return os.path.basename(e), st.st_mtime_ns, st.st_size, st.st_ino

    stamps = [stamp(path)]
    if os.path.isdir(path):
        with os.scandir(path) as it:
            stamps += sorted(stamp(e) for e in it if e.is_file())
    return cached_index(path, tuple(stamps))


def _eager(adapter: Adapter) -> AdapterIndex:
    refs = {m.name: ModuleRef(m.name, m.key, m.shape, m.rank, m.alpha, m.scaling, m.layout) for m in adapter}
    return AdapterIndex(adapter.path, adapter.label, refs, adapter.__getitem__, tuple(adapter.flags))


def _lazy_peft(folder: Path, wfile: Path) -> AdapterIndex:
    settings = read_settings(folder / CONFIG_NAME)
    store = open_tensor_file(wfile)
    assert isinstance(store, SafetensorsStore)
    pairs: dict[str, dict[str, str]] = {}
    for info in store.infos():
        pk = parse_peft_key(info.name)
        if pk.role != "other":
            pairs.setdefault(pk.module, {})[pk.role] = info.name
    written = _written_layouts(store)  # layouts lora_lens recorded (as load_adapter reads them)
    refs = {}
    for name, p in pairs.items():
        if len(p) != 2:
            # Let the eager reader word the error exactly as everywhere else.
            return _eager(load_adapter(folder))
        a_key = p.get("A") or p["emb_A"]
        b_key = p.get("B") or p["emb_B"]
        a_shape, b_shape = store.info(a_key).shape, store.info(b_key).shape
        layout = ("embedding" if "emb_A" in p else "conv" if len(a_shape) == 4
                  else written.get(name, "conv1d" if settings.fan_in_fan_out else "linear"))
        r = int(a_shape[0])
        n = 1
        for d in a_shape[1:]:
            n *= int(d)
        if b_shape[1] != r:
            raise ShapeError(f"{wfile}: '{name}' has lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)}; "
                             "expected A (r, n) and B (m, r) with the same r. The adapter is corrupt.")
        _, alpha = rank_and_alpha(settings, name)
        refs[name] = ModuleRef(name, parse_module_path(name), (int(b_shape[0]), n), r, alpha,
                               lora_scaling(alpha, r, settings.use_rslora), layout)
    if not refs:
        return _eager(load_adapter(folder))
    refs = dict(sorted(refs.items(), key=lambda kv: kv[1].key.sort_key()))
    keys = {name: (p.get("A") or p["emb_A"], p.get("B") or p["emb_B"]) for name, p in pairs.items()}

    def read(name: str) -> LoraModule:
        ref = refs[name]
        a_key, b_key = keys[name]
        A = check_tensor(store.get(a_key, validate=False), a_key, wfile)
        B = check_tensor(store.get(b_key, validate=False), b_key, wfile)
        return LoraModule(name, ref.key, A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1),
                          alpha=ref.alpha, scaling=ref.scaling, layout=ref.layout)

    label = folder.name
    return AdapterIndex(folder, label, refs, read)
