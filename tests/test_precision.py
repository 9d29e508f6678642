"""full_fp32: lora_lens's products run in full float32 whatever TF32 setting the program chose, through either
of PyTorch's two flag APIs, and the program's own setting (and API) is back afterwards, nested or not.

Each case runs in a fresh interpreter: the flags are process-wide, and PyTorch ≥ 2.9 refuses to read one API
after the other was set, so a case must not leave its setting to the tests after it.
"""

import subprocess
import sys
import textwrap

import pytest
import torch

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")

CASE = """
import torch
from lora_lens.precision import _current, full_fp32, full_fp32_products
{setup}
before = _current()

@full_fp32
def inner():
    with full_fp32_products():  # nested: the outer call restores, not this one
        nested = _current()
    return nested, _current()

nested, inside = inner()
after = _current()
print(before, nested, inside, after)
assert nested in (("legacy", "highest"), ("new", "ieee")), nested
assert inside == nested, inside
assert after == before, (before, after)
{check}
"""


@pytest.mark.parametrize("setup, check", [
    ("torch.backends.cuda.matmul.allow_tf32 = True", "assert torch.backends.cuda.matmul.allow_tf32"),
    ("torch.set_float32_matmul_precision('high')", "assert torch.get_float32_matmul_precision() == 'high'"),
    ("torch.set_float32_matmul_precision('medium')", "assert torch.get_float32_matmul_precision() == 'medium'"),
    ("pass", "assert torch.get_float32_matmul_precision() == 'highest'"),
    pytest.param("torch.backends.cuda.matmul.fp32_precision = 'tf32'",
                 "assert torch.backends.cuda.matmul.fp32_precision == 'tf32'",
                 marks=pytest.mark.skipif(not NEW_API, reason="torch < 2.9 has one API")),
])
def test_full_fp32_inside_and_the_callers_setting_after(setup, check):
    code = textwrap.dedent(CASE).format(setup=setup, check=check)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_restored_when_the_call_raises():
    code = textwrap.dedent("""
        import torch
        from lora_lens.precision import full_fp32
        torch.set_float32_matmul_precision('high')

        @full_fp32
        def boom():
            raise ValueError("x")

        try:
            boom()
        except ValueError:
            pass
        assert torch.get_float32_matmul_precision() == 'high'
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


def test_the_kernels_are_guarded():
    """The public kernels that multiply float32 tensors on a device carry the guard (a TF32 caller on a GPU
    would otherwise get ~3e-4 relative error in spectra and φ; tests/test_cuda.py measures it there)."""
    from lora_lens import linalg, randomized, types
    from lora_lens.compare import collection_kernel
    from lora_lens.ops import intruders

    for fn in (linalg.factored_svd, linalg.factored_svdvals, linalg.factored_svd_folded, linalg.phi,
               linalg.phi_grid, linalg.principal_angles, linalg.lstsq, linalg.stacked_lstsq, linalg.randomized_svd,
               randomized.range_svd, types.LoraModule.delta, collection_kernel.module_task, intruders.reduce_module):
        assert getattr(fn, "__wrapped__", None) is not None, fn.__qualname__
