"""Hostile and odd inputs through the CLI: exit 2, one line, no traceback, no hang, no allocation by claim."""

from __future__ import annotations

import json
import os
import socket
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lora_lens.errors import CheckpointError, UnsafeFileError
from lora_lens.io.npz import read_npz
from lora_lens.io.safetensors_header import read_safetensors_header
from lora_lens.io.tensors import open_tensor_file

from .cli_utils import assert_bad_input
from .cli_utils import run as run_cli
from .fuzz_inputs import time_limit
from .hostile_files import (
    CONFIG,
    claim_size_in_zip,
    safetensors_from,
    seed_safetensors,
    seed_torch_zip,
    split_safetensors,
    write_adapter,
)


def run(*args):
    return run_cli("inspect", *args)


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_adapter(tmp_path / "adapter")


def test_seed_adapter_reads(adapter):
    r = run(adapter, "--json")
    assert r.exit_code == 0, r.output
    assert {m["rank"] for m in json.loads(r.stdout)["modules"]} == {2}


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_as_weights_file_refused_without_hanging(adapter, tmp_path):
    os.remove(adapter / "adapter_model.safetensors")
    os.mkfifo(adapter / "adapter_model.safetensors")  # opening it for reading would block forever
    with time_limit(30):  # a regression fails here instead of freezing the suite
        assert_bad_input(run(adapter), "adapter_model.safetensors", "FIFO")
        os.mkfifo(tmp_path / "model.safetensors")
        assert_bad_input(run(tmp_path / "model.safetensors"), "FIFO")


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero")
def test_device_file_as_weights_file_refused(adapter, tmp_path):
    os.remove(adapter / "adapter_model.safetensors")
    os.symlink("/dev/zero", adapter / "adapter_model.safetensors")  # endless zeros
    assert_bad_input(run(adapter), "adapter_model.safetensors", "device file")
    os.symlink("/dev/zero", tmp_path / "zero.bin")
    assert_bad_input(run(tmp_path / "zero.bin"), "zero.bin", "device file")


def test_symlink_loop(tmp_path, adapter):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert_bad_input(run(tmp_path / "a"), "symlink loop")
    os.remove(adapter / "adapter_model.safetensors")
    os.symlink(adapter / "adapter_model.safetensors", adapter / "adapter_model.safetensors")
    assert_bad_input(run(adapter), "adapter_model.safetensors", "symlink loop")


@pytest.mark.parametrize("argv", [
    ["spectrum", "{loop}"],
    ["similarity", "{loop}", "{adapter}"],
    ["similarity", "{adapter}", "{loop}"],
    ["collection", "{adapter}", "{loop}", "-o", "{out}"],
    ["report", "{loop}", "-o", "{out}"],
    ["reduce", "{loop}", "--rank", "1", "-o", "{out}"],
    ["convert", "{loop}", "-o", "{out}"],
    ["alignment", "{adapter}", "--base", "{loop}"],
    ["condlora", "analyze", "{loop}", "--base", "{loop}"],
    ["pissa", "--base", "{loop}", "--rank", "1", "--targets", "q_proj", "-o", "{out}"],
    ["cora", "basis", "--base", "{loop}", "--rank", "1", "--targets", "q_proj", "-o", "{out}"],
    ["train", "--method", "lora", "--base", "{loop}", "-o", "{out}"],
    ["spectrum", "{through}"],
])
def test_symlink_loop_is_bad_input_for_every_command(tmp_path, adapter, argv):
    """The loop is caught where every reader registers its input, not per command (spectrum used to exit 1)."""
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    paths = {"loop": tmp_path / "loop", "adapter": adapter, "out": tmp_path / "out",
             "through": tmp_path / "loop" / "adapter_model.safetensors"}
    line = assert_bad_input(run_cli(*[a.format(**paths) for a in argv]), "loop")
    # a loop inside the path ('through') reads as absent to os.stat's callers; never "internal error"
    assert "symlink loop" in line or (argv[-1] == "{through}" and "no such file" in line), line


@pytest.mark.parametrize("name", ["with spaces", "ünïcödé-名前", "new\nline"])
def test_odd_path_names_work(tmp_path, name):
    folder = write_adapter(tmp_path / name / name)
    r = run(folder, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["path"] == str(folder)


def test_folder_named_like_the_weights_file(adapter):
    os.remove(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").mkdir()
    assert_bad_input(run(adapter), "adapter_model.safetensors", "is a folder")


def test_deeply_nested_json_config(adapter):
    depth = 10_000
    (adapter / "adapter_config.json").write_text('{"r": 2, "x": ' + "[" * depth + "]" * depth + "}")
    assert_bad_input(run(adapter), "adapter_config.json", "nested too deeply")


def test_deeply_nested_json_header(adapter):
    depth = 10_000
    blob = safetensors_from({"__metadata__": {}})
    raw = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    (adapter / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert blob  # the builder itself works on ordinary headers
    assert_bad_input(run(adapter), "adapter_model.safetensors", "nested too deeply")


@pytest.mark.parametrize("key, value, needle", [
    ("r", 0, "between 1 and"),
    ("r", -4, "between 1 and"),
    ("r", "8", "positive integer rank"),
    ("r", 1e9, "positive integer rank"),
    ("r", 10**9, "between 1 and"),
    ("r", True, "positive integer rank"),
    ("lora_alpha", float("nan"), "finite number"),
    ("lora_alpha", "16", "finite number"),
    ("target_modules", 5, "list of module names"),
    ("use_rslora", "false", "true or false"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern.q_proj"),
    ("alpha_pattern", [1], "alpha_pattern"),
    ("base_model_name_or_path", 7, "string or null"),
])
def test_config_values_of_wrong_type_or_range(adapter, key, value, needle):
    (adapter / "adapter_config.json").write_text(json.dumps({**CONFIG, key: value}))  # NaN: Python writes 'NaN'
    line = assert_bad_input(run(adapter), "adapter_config.json", f"'{key}", needle)
    assert "expected" in line


def test_duplicate_keys_in_config_refused(adapter):
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "r": 8}')
    assert_bad_input(run(adapter), "adapter_config.json", "'r' appears twice")


def test_url_as_base_model_is_never_fetched(adapter, monkeypatch):
    url = "http://127.0.0.1:9/never-fetched"
    (adapter / "adapter_config.json").write_text(json.dumps({**CONFIG, "base_model_name_or_path": url}))
    attempts = []

    def no_network(self, *args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    r = run(adapter, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["base_model_name_or_path"] == url and attempts == []


# ---- safetensors headers that lie -------------------------------------------------------------------------------

def _mutate_header(adapter: Path, edit) -> None:
    header, data = split_safetensors(seed_safetensors())
    data = edit(header, data) or data
    (adapter / "adapter_model.safetensors").write_bytes(safetensors_from(header, data))


def _first_two(header):
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return header[names[0]], header[names[1]]


def test_overlapping_tensors_refused(adapter):
    def overlap(h, data):
        a, b = _first_two(h)
        n = b["data_offsets"][1] - b["data_offsets"][0]
        b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + n]  # b aliases a's bytes
    _mutate_header(adapter, overlap)
    assert_bad_input(run(adapter), "adapter_model.safetensors", "overlaps")


def test_gap_between_tensors_refused(adapter):
    def gap(h, data):
        for e in h.values():
            if isinstance(e, dict) and "data_offsets" in e and e["data_offsets"][0] > 0:
                e["data_offsets"] = [o + 4 for o in e["data_offsets"]]
        return data[:64] + b"\0" * 4 + data[64:]  # the first tensor is 2×8 F32 = 64 bytes
    _mutate_header(adapter, gap)
    assert_bad_input(run(adapter), "adapter_model.safetensors", "gap")


def test_duplicate_keys_in_safetensors_header_refused(adapter):
    header, data = split_safetensors(seed_safetensors())
    name = next(k for k in header if k != "__metadata__")
    raw = json.dumps(header).encode()
    dup = json.dumps({name: header[name]}).encode()[1:-1]
    raw = raw[:-1] + b", " + dup + b"}"  # the same name twice, the same bytes
    (adapter / "adapter_model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    assert_bad_input(run(adapter), "adapter_model.safetensors", "appears twice")


def _peak_bytes(fn, *args) -> int:
    tracemalloc.start()
    try:
        fn(*args)
    except CheckpointError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_header_claiming_a_trillion_elements(adapter, tmp_path):
    header = {"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    f = tmp_path / "huge.safetensors"
    f.write_bytes(safetensors_from(header, b"\0" * 64))
    with pytest.raises(CheckpointError, match="file holds 64"):
        read_safetensors_header(f)
    assert _peak_bytes(read_safetensors_header, f) < 1 << 20
    assert_bad_input(run(f), "huge.safetensors")


def test_header_length_claiming_100_mb(tmp_path):
    small = tmp_path / "small.safetensors"
    small.write_bytes((100 * 10**6).to_bytes(8, "little") + b"{}")
    assert_bad_input(run(small), "header claims 100,000,000 bytes")
    assert _peak_bytes(read_safetensors_header, small) < 1 << 20
    # A file that really is that large (sparse: no disk used) but over the header limit: refused unread.
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as fh:
        fh.write((150 * 10**6).to_bytes(8, "little") + b"{")
        fh.truncate(160 * 10**6)
    assert_bad_input(run(sparse), "exceeds the 100,000,000-byte limit")
    assert _peak_bytes(read_safetensors_header, sparse) < 1 << 20


def test_torch_zip_entry_claiming_10_gb(tmp_path):
    f = tmp_path / "adapter_model.bin"
    f.write_bytes(claim_size_in_zip(seed_torch_zip(), "data/0", 10 * 10**9))
    assert_bad_input(run(f.parent), "adapter_model.bin", "10,000,000,000")
    assert _peak_bytes(open_tensor_file, f) < 1 << 20


def test_raw_pickle_bin_refused_unread(tmp_path):
    import pickle

    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(CONFIG))
    (tmp_path / "ad" / "adapter_model.bin").write_bytes(pickle.dumps({"w": [1.0]}))
    assert_bad_input(run(tmp_path / "ad"), "adapter_model.bin", "refused", "not a zip-format")


# ---- .npz -------------------------------------------------------------------------------------------------------

class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/lora_lens_npz_pwned_should_not_exist",))


def test_npz_object_array_refused_without_unpickling(tmp_path):
    marker = Path("/tmp/lora_lens_npz_pwned_should_not_exist")
    marker.unlink(missing_ok=True)
    np.savez(tmp_path / "evil.npz", w=np.array([_Exploit()], dtype=object))
    with pytest.raises(UnsafeFileError, match="object array"):
        read_npz(tmp_path / "evil.npz")
    assert not marker.exists()


def test_npz_plain_arrays_read_back(tmp_path):
    a, b = np.arange(6.0).reshape(2, 3), np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    np.savez(tmp_path / "ok.npz", a=a, b=b)
    np.savez_compressed(tmp_path / "okc.npz", a=a, b=b)
    for name in ("ok.npz", "okc.npz"):
        got = read_npz(tmp_path / name)
        assert np.array_equal(got["a"], a) and np.array_equal(got["b"], b) and got["b"].dtype == np.float32


def test_npz_member_claiming_10_gb(tmp_path):
    np.savez(tmp_path / "ok.npz", a=np.zeros((4, 4)))
    f = tmp_path / "big.npz"
    f.write_bytes(claim_size_in_zip((tmp_path / "ok.npz").read_bytes(), "a.npy", 10 * 10**9))
    with pytest.raises(CheckpointError, match="claims"):
        read_npz(f)
    assert _peak_bytes(read_npz, f) < 1 << 20


def test_hostile_layout_metadata_is_ignored(adapter):
    from safetensors.torch import load as st_load, save as st_save

    from lora_lens.io.peft import LAYOUTS_KEY

    tensors = st_load(seed_safetensors())
    deep = "[" * 10_000 + "]" * 10_000
    (adapter / "adapter_model.safetensors").write_bytes(st_save(tensors, metadata={LAYOUTS_KEY: deep}))
    r = run(adapter, "--json")
    assert r.exit_code == 0, r.output
