"""Property-based fuzzing of every reader: a mutated input reads correctly or is refused with lora_lens's error.

Seeds are valid files (a PEFT safetensors adapter, its adapter_config.json, a
torch.save zip, an .npz); hypothesis mutates them byte-wise and structurally
(tests/fuzz_inputs.py). Each case runs under a 10 s alarm; the number of
examples is small so the module stays within a few seconds. Longer runs:
``python scripts/fuzz_readers.py`` (docs/guarantees.md records one).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fuzz_inputs import BYTE_OPS, KINDS, ODD_VALUES, check_case, mutate_bytes, mutate_structure, seed_bytes

EXAMPLES = int(os.environ.get("LORA_LENS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

byte_ops = st.lists(st.tuples(st.integers(0, 2**20), st.sampled_from(BYTE_OPS), st.integers(0, 255)),
                    min_size=1, max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
odd_values = st.sampled_from(ODD_VALUES) | json_values


@pytest.mark.parametrize("kind", KINDS)
def test_seed_reads(kind):
    assert check_case(kind, seed_bytes(kind)) == "read"


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(ops=byte_ops)
def test_byte_mutations_read_or_refuse(kind, ops):
    assert check_case(kind, mutate_bytes(seed_bytes(kind), ops)) in ("read", "refused")


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(choice=st.integers(0, 10_000), value=odd_values)
def test_structural_mutations_read_or_refuse(kind, choice, value):
    assert check_case(kind, mutate_structure(kind, seed_bytes(kind), choice, value)) in ("read", "refused")


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(choice=st.integers(0, 10_000), value=odd_values, ops=byte_ops)
def test_structural_then_byte_mutations(kind, choice, value, ops):
    blob = mutate_bytes(mutate_structure(kind, seed_bytes(kind), choice, value), ops)
    assert check_case(kind, blob) in ("read", "refused")


#: Every failure the fuzzer found, kept as it was found: (kind, structural edit or None, byte ops).
REGRESSIONS = [
    ("npz", None, [(188458, "flip", 6)]),  # zipfile raised NotImplementedError ('zip file version 10.9')
    ("safetensors", (0, []), []),
    ("npz", None, [(0, "insert", 0)]),  # junk before the zip: read by zipfile, refused by numpy (now refused)  # a list as dtype: TypeError 'unhashable type' in the header check
]


@pytest.mark.parametrize("kind, structural, ops", REGRESSIONS)
def test_found_by_fuzzing(kind, structural, ops):
    blob = seed_bytes(kind)
    if structural is not None:
        blob = mutate_structure(kind, blob, *structural)
    assert check_case(kind, mutate_bytes(blob, ops)) in ("read", "refused")
