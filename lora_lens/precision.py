"""Full-precision float32 products inside lora_lens's linear algebra, whatever the caller set.

PyTorch lets a program trade float32 matmul precision for speed: ``torch.backends.cuda.matmul.allow_tf32 =
True``, ``torch.set_float32_matmul_precision("high")`` (what Hugging Face's ``TrainingArguments(tf32=True)``
and Lightning's advice do) or ``torch.backends.cuda.matmul.fp32_precision = "tf32"``. The setting is
global, so a notebook that trains with TF32 and then measures an adapter would compute its spectra,
φ and error bounds from products rounded to TF32's 10-bit mantissa: about 3e-4 relative error
where lora_lens promises float32 (~1e-7) and certifies bounds from residuals of that size.

:func:`full_fp32` (a decorator and a context manager) sets full IEEE float32 products for the call and
puts the caller's setting back after it. bf16 products the range finder chooses on purpose (its half
passes, checked against float32 ones) are unaffected: the flag only governs float32 inputs.

PyTorch ≥ 2.9 has two APIs for the flag and raises when a program reads one after setting the other,
so the caller's own API is used for the save and the restore. Nested and concurrent calls (Dask's
threads) share one depth count: the caller's setting is restored when the last one leaves. The flag is
process-wide, so while a lora_lens call runs, other threads of the program (a training loop beside it)
also multiply in full float32, and a change another thread makes to the flag during the call is undone
when the call ends. Restoring through the legacy API writes the legacy value back, which PyTorch ≥ 2.9
maps onto both its CUDA and CPU (oneDNN) matmul flags.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)

_lock = threading.Lock()
_depth = 0
_saved: tuple[str, str] | None = None  # (API, the caller's value)


def _matmul_backend():
    return torch.backends.cuda.matmul


def _current() -> tuple[str, str]:
    """``("legacy", "highest" | "high" | "medium")`` or ``("new", "ieee" | "tf32" | "none")``: the API the
    program uses (reading the other one would raise) and its value."""
    try:
        return "legacy", torch.get_float32_matmul_precision()
    except RuntimeError:  # the program set the new API: the legacy getter refuses to read it
        return "new", _matmul_backend().fp32_precision


def _set(api: str, value: str) -> None:
    if api == "legacy":
        torch.set_float32_matmul_precision(value)
    else:
        _matmul_backend().fp32_precision = value


def _exact(api: str, value: str) -> bool:
    return value == "highest" if api == "legacy" else value in ("ieee", "none")


@contextmanager
def full_fp32_products():
    """Inside: float32 matmuls in full precision (no TF32); the caller's setting restored on exit."""
    global _depth, _saved
    with _lock:
        if _depth == 0:
            api, value = _current()
            _saved = None if _exact(api, value) else (api, value)
            if _saved is not None:
                _set(api, "highest" if api == "legacy" else "ieee")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                _set(*_saved)
                _saved = None


def full_fp32(fn: F) -> F:
    """Decorator: ``fn`` runs under :func:`full_fp32_products`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with full_fp32_products():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
