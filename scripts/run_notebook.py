"""Run a notebook's code cells in order as a plain script, without Jupyter (what tests/test_notebooks.py does).

    PYTHONPATH=$PWD python scripts/run_notebook.py notebooks/01_analyze_an_adapter.ipynb [--small]

Each code cell is compiled under the name ``<notebook>[cell N]`` (so a traceback
says which cell failed) and executed in one fresh namespace, from a working
folder of your choice (default: the current one). Figures are built with the
Agg backend and not shown; printed output goes to stdout. ``--small`` sets
``LORA_LENS_NOTEBOOK_SMALL=1``: the notebooks then run at tiny sizes.
IPython syntax (``%magic``, ``!shell``) is refused: the notebooks stay plain Python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator


def code_cells(path: str | Path) -> list[str]:
    """The source of every code cell, in order; checks the notebook is nbformat 4 with code/markdown cells."""
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    if nb.get("nbformat") != 4:
        raise ValueError(f"{path}: nbformat {nb.get('nbformat')!r}; expected a version 4 notebook.")
    sources = []
    for i, cell in enumerate(nb["cells"]):
        kind = cell.get("cell_type")
        if kind not in ("code", "markdown"):
            raise ValueError(f"{path}: cell {i} is of type {kind!r}; expected code or markdown.")
        if kind == "code":
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            magic = [line for line in src.splitlines() if line.lstrip().startswith(("%", "!"))]
            if magic:
                raise ValueError(f"{path}: cell {i} uses IPython syntax ({magic[0].strip()!r}); "
                                 "keep notebook code plain Python so it runs as a script.")
            sources.append((i, src))
    return sources


@contextlib.contextmanager
def _environment(workdir: Path, small: bool) -> Iterator[None]:
    saved_cwd, saved_env = Path.cwd(), dict(os.environ)
    os.environ.setdefault("MPLBACKEND", "Agg")
    if small:
        os.environ["LORA_LENS_NOTEBOOK_SMALL"] = "1"
    os.chdir(workdir)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_notebook(path: str | Path, workdir: str | Path | None = None, small: bool = False) -> dict:
    """Execute the notebook's code cells in one fresh namespace; returns that namespace."""
    path = Path(path).resolve()
    cells = code_cells(path)
    namespace: dict = {"__name__": "__main__", "__file__": str(path)}
    with _environment(Path(workdir) if workdir is not None else Path.cwd(), small):
        for i, src in cells:
            exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)
    return namespace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--small", action="store_true", help="tiny sizes (LORA_LENS_NOTEBOOK_SMALL=1), as the tests")
    parser.add_argument("--workdir", type=Path, default=None, help="run from this folder (default: the current one)")
    args = parser.parse_args(argv)
    for nb in args.notebooks:
        t0 = time.perf_counter()
        print(f"=== {nb}", flush=True)
        run_notebook(nb, args.workdir, args.small)
        print(f"=== {nb}: {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
