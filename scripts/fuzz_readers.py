"""Long fuzz run over every reader: count inputs, refusals and failures.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/fuzz_readers.py --cases 100000 --seed 0 [--kinds safetensors,npz]

Uses the mutators of the test suite (tests/fuzz_inputs.py) with a seeded
``random.Random`` instead of hypothesis (no shrinking, so many more inputs
per second). The process runs under an address-space limit (``--max-memory``,
default 4 GiB): an allocation sized by a claim in the file, rather than by its
bytes, shows up as a MemoryError failure. Each failure prints as one line
with the kind and mutation that reproduce it; add it to REGRESSIONS in
tests/test_fuzz_readers.py. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import collections
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz_inputs import (  # noqa: E402
    BYTE_OPS,
    KINDS,
    ODD_VALUES,
    FuzzFailure,
    check_case,
    mutate_bytes,
    mutate_structure,
    seed_bytes,
)


def random_case(rng: random.Random, kind: str, seed: bytes):
    """A mutation description (structural part or None, byte ops) and the mutated bytes."""
    structural = (rng.randrange(10_000), rng.choice(ODD_VALUES)) if rng.random() < 0.5 else None
    n_ops = 0 if structural is not None and rng.random() < 0.5 else rng.randint(1, 6)
    ops = [(rng.randrange(2**20), rng.choice(BYTE_OPS), rng.randrange(256)) for _ in range(n_ops)]
    blob = seed if structural is None else mutate_structure(kind, seed, *structural)
    return structural, ops, mutate_bytes(blob, ops)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="inputs in total, spread evenly over the kinds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--max-memory", type=int, default=4 << 30, help="address-space limit in bytes")
    args = ap.parse_args()
    resource.setrlimit(resource.RLIMIT_AS, (args.max_memory, args.max_memory))
    rng = random.Random(args.seed)
    kinds = args.kinds.split(",")
    seeds = {k: seed_bytes(k) for k in kinds}
    counts: dict[str, collections.Counter] = {k: collections.Counter() for k in kinds}
    failures: list[str] = []
    start = time.perf_counter()
    for i in range(args.cases):
        kind = kinds[i % len(kinds)]
        structural, ops, blob = random_case(rng, kind, seeds[kind])
        try:
            counts[kind][check_case(kind, blob)] += 1
        except (FuzzFailure, MemoryError) as e:
            counts[kind]["FAILED"] += 1
            failures.append(f"{kind} structural={structural!r} ops={ops!r}: {type(e).__name__}: {str(e)[:200]}")
            print("FAIL", failures[-1], flush=True)
    took = time.perf_counter() - start
    print(f"{args.cases} inputs in {took:.0f} s (seed {args.seed}, {args.cases / took:.0f}/s)")
    for k in kinds:
        print(f"  {k:12s} " + "  ".join(f"{what}={n}" for what, n in sorted(counts[k].items())))
    print(f"failures: {len(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
