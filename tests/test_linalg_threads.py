"""lstsq on the CPU with several threads (a torch bug in batched LU)."""

import subprocess
import sys
from pathlib import Path


def test_batched_square_lstsq_with_threads_solves_exactly():
    """pytorch/pytorch#142815: batched CPU solve breaks with >1 thread; lstsq must still solve (and print nothing)."""
    code = (
        "import torch; torch.set_num_threads(2); from lora_lens.linalg import lstsq\n"
        "g = torch.Generator().manual_seed(0); W = torch.randn(3, 160, 160, generator=g, dtype=torch.float64)\n"
        "B = torch.randn(3, 160, 4, generator=g, dtype=torch.float64); X, r = lstsq(W, B)\n"
        "assert float(r.max()) < 1e-10 and torch.allclose(W @ X, B); print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok" and "MKL" not in out.stdout + out.stderr
