"""The one chunk iterator (group by shape → memory-budget chunks → stack on the device) and ``load_w0``.

Every stage that works on many matrices at once — adapter spectra, base
subspaces, alignment and intruders, CoRA bases, CondLoRA's conversion
matrices — goes through :func:`chunks`: items with the same shape key are
grouped (first-seen order), each group is cut into runs that fit
``Compute.max_memory`` given what one item costs on the device, and the
consumer stacks each run with :func:`stack` (one item at a time into one
device buffer of the compute dtype, so no stored-dtype stack is ever held).

Chunking changes how many matrices one batched call sees, never a number:
random draws are seeded per item (:func:`~lora_lens.compute.item_seed`).

:func:`load_w0` is the one place that knows how a base weight is laid out: a
GPT-2 ``Conv1D`` or an ``Embedding`` stores ``(n, m)``, a Conv kernel
``(out, in, kh, kw)`` is flattened to ``(out, in·kh·kw)`` as PEFT's factors
are; everything is returned in PyTorch's ``(m, n)`` layout.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Hashable, Iterator, Sequence, TypeVar

import torch

from .compute import Compute
from .errors import ShapeError
from .io.base import BaseWeights

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

#: Layouts whose base weight is stored as ``(n, m)``.
TRANSPOSED = ("conv1d", "embedding")


def chunk_size(per_item_bytes: int, max_memory: int | None, total: int) -> int:
    """How many items fit a memory budget (at least one; all of them without a budget)."""
    if not max_memory:
        return max(total, 1)
    return max(1, min(total, max_memory // max(per_item_bytes, 1)))


def chunks(
    items: Sequence[T],
    shape: Callable[[T], K],
    bytes_per_item: Callable[[K], int],
    compute: Compute,
    label: Callable[[K], str] = str,
) -> Iterator[tuple[K, list[T]]]:
    """Yield ``(shape key, run of items)``: same-key items, at most ``compute.max_memory`` bytes a run.

    ``shape(item)`` is the grouping key (e.g. ``(m, n)`` or ``((m, n), r)``),
    ``bytes_per_item(key)`` what one item of that key costs on the device.
    Groups come in first-seen order and items keep their order inside a group.
    ``compute.progress(done, total, label(key))`` is called when the consumer
    asks for the next run, i.e. once it is done with the previous one.
    """
    groups: OrderedDict[K, list[T]] = OrderedDict()
    for item in items:
        groups.setdefault(shape(item), []).append(item)
    done, total = 0, len(items)
    for key, group in groups.items():
        step = chunk_size(bytes_per_item(key), compute.max_memory, len(group))
        for lo in range(0, len(group), step):
            run = group[lo: lo + step]
            yield key, run
            done += len(run)
            compute.report(done, total, label(key))


def stack(compute: Compute, items: Sequence[T], load: Callable[[T], torch.Tensor],
          keep: tuple[torch.dtype, ...] = ()) -> torch.Tensor:
    """``(L, …)`` on ``compute.device`` in ``compute.dtype``: ``load(item)`` of each item, copied in one at a time.

    Only one item's tensor in its stored dtype exists at a time besides the
    device buffer (without ``keep``, a bf16 checkpoint is never stacked in bf16
    and then copied).
    ``keep``: stored dtypes stacked as they are when every item has the same one
    (the range finder's half passes read bf16 weights as stored); the stack is
    upcast to ``compute.dtype`` as soon as an item of another dtype comes.
    """
    first = load(items[0])
    dtype = first.dtype if first.dtype in keep else compute.dtype
    out = torch.empty(len(items), *first.shape, device=compute.device, dtype=dtype)
    out[0].copy_(first)
    del first
    for i in range(1, len(items)):
        W = load(items[i])
        if W.dtype != out.dtype and out.dtype != compute.dtype:  # mixed stored dtypes: no rounding of this one
            out = out.to(compute.dtype)
        out[i].copy_(W)
        del W
    return out


def stacked_chunks(
    items: Sequence[T],
    shape: Callable[[T], K],
    bytes_per_item: Callable[[K], int],
    compute: Compute,
    load: Callable[[T], torch.Tensor],
    label: Callable[[K], str] = str,
    prefetch: bool = True,
    keep: Callable[[K], tuple[torch.dtype, ...]] = lambda key: (),
) -> Iterator[tuple[K, list[T], torch.Tensor]]:
    """:func:`chunks` with each run stacked (:func:`stack`): yield ``(shape key, run, (L, …) tensor)``.

    With ``prefetch`` the next run is read and stacked on a background thread
    while the caller works on this one (reading safetensors slices and the
    bf16 → float32 copy overlap the linear algebra). Two runs' inputs then
    exist at once: ``bytes_per_item`` must count one extra input per item,
    and does so whether or not ``prefetch`` is on, so the runs — hence every
    number — are the same both ways. The caller should drop its reference to
    the tensor before asking for the next run. Progress is reported when the
    caller asks for the next run, as :func:`chunks` does. ``keep(key)``: the
    stored dtypes a run of that key is stacked in as they are (see :func:`stack`).
    """
    runs = list(chunks(items, shape, bytes_per_item, replace(compute, progress=None), label))  # names only: cheap
    done, total = 0, len(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora_lens-read") if prefetch else _NoPool() as pool:
        def submit(i):
            return pool.submit(stack, compute, runs[i][1], load, keep(runs[i][0])) if i < len(runs) else None

        pending = submit(0)
        for i, (key, run) in enumerate(runs):
            W = pending.result()  # re-raises a read error here, in the caller's thread
            pending = submit(i + 1)
            yield key, run, W
            del W
            done += len(run)
            compute.report(done, total, label(key))


class _NoPool:
    """``prefetch=False``: ``submit`` defers the call to ``result()``, in this thread (one run at a time)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        return _Deferred(fn, args)


class _Deferred:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


def load_w0(base: BaseWeights, weight: str, layout: str = "linear",
            expect: tuple[int, int] | None = None) -> torch.Tensor:
    """One base weight as ``(m, n)`` in its stored dtype (NaN/Inf refused by ``base.get``).

    ``layout``: ``linear``/``lora`` (stored ``(m, n)``), ``conv1d`` and
    ``embedding`` (stored ``(n, m)``), ``conv`` (a kernel, flattened). With
    ``expect``, a weight of another ``(m, n)`` raises :class:`ShapeError`.
    """
    W = base.get(weight)
    if layout in TRANSPOSED:
        W = W.T
    elif W.dim() > 2:  # Conv kernel (out, in, kh, kw) → (m, n)
        W = W.reshape(W.shape[0], -1)
    if expect is not None and tuple(W.shape) != tuple(expect):
        raise ShapeError(f"{base.path}: tensor '{weight}' is {tuple(W.shape)} in (m, n) layout ({layout}); expected "
                         f"{tuple(expect)}. Check that the base is the model these weights belong to.")
    return W
