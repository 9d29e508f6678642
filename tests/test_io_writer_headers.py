"""Files whose safetensors headers are byte-for-byte what each real writer emits, all read.

The header check (``lora_lens/io/safetensors_header.py``) refuses hostile
headers; these fixtures keep it from refusing real ones again (issue 20: every
MLX-LM ``adapters.safetensors`` was refused for its ``"__metadata__":null``).

- MLX (``mlx.core.save_safetensors``, ``mlx/io/safetensors.cpp``): an
  nlohmann ``json`` whose ``"__metadata__"`` is a default-constructed ``json``
  (``null``) unless metadata is given; ``dump()`` without indent (no spaces),
  keys in ``std::map`` (byte) order, each tensor ``{"data_offsets", "dtype",
  "shape"}``, data in the ``unordered_map``'s iteration order (not the key
  order), no padding. MLX is not installed here, so :func:`mlx_bytes` writes
  exactly that; the safetensors library itself must read it too.
- safetensors' torch and numpy writers, diffusers' ``save_lora_weights`` and
  kohya (sd-scripts calls ``safetensors.torch.save_file`` with ``ss_*``
  metadata): written by the installed libraries themselves.

Every fixture is read through ``load_adapter`` and checked against the float64
product of the factors it was built from.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lora_lens.io import load_adapter
from lora_lens.io.safetensors_header import read_safetensors_header

from .cli_utils import assert_bad_input, run

#: numpy dtype → safetensors dtype name, as MLX's ``dtype_to_safetensor_str`` writes them.
_ST = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("float64"): "F64"}


def mlx_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file exactly as ``mlx.core.save_safetensors`` writes it (see the module docstring)."""
    order = list(arrays)[::-1]  # an unordered_map's order: here simply not the sorted key order
    header: dict = {"__metadata__": dict(metadata) if metadata else None}
    offset = 0
    for k in order:
        a = arrays[k]
        header[k] = {"data_offsets": [offset, offset + a.nbytes], "dtype": _ST[a.dtype], "shape": list(a.shape)}
        offset += a.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return struct.pack("<Q", len(text)) + text + b"".join(np.ascontiguousarray(arrays[k]).tobytes() for k in order)


def header_text(path) -> bytes:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def close(module, ref: np.ndarray | torch.Tensor):
    ref = torch.as_tensor(ref, dtype=torch.float64)
    return torch.allclose(module.delta().double(), ref, atol=1e-12 * float(ref.norm()))


# --- MLX -------------------------------------------------------------------------------------

MLX_CONFIG = {"adapter_path": "adapters", "batch_size": 4, "fine_tune_type": "lora", "iters": 100,
              "lora_parameters": {"rank": 4, "dropout": 0.0, "scale": 20.0}, "model": "mlx-community/tiny",
              "num_layers": 2, "seed": 0}


def mlx_adapter(folder, metadata=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for layer, dtype in ((0, np.float32), (1, np.float16)):
        for proj, (n, m) in (("q_proj", (12, 16)), ("v_proj", (12, 8))):
            stem = f"model.layers.{layer}.self_attn.{proj}"
            arrays[f"{stem}.lora_a"] = rng.standard_normal((n, 4)).astype(dtype)  # (in, r)
            arrays[f"{stem}.lora_b"] = rng.standard_normal((4, m)).astype(dtype)  # (r, out)
    folder.mkdir(exist_ok=True)
    (folder / "adapters.safetensors").write_bytes(mlx_bytes(arrays, metadata))
    (folder / "adapter_config.json").write_text(json.dumps(MLX_CONFIG, indent=4))
    return arrays


@pytest.mark.parametrize("metadata, starts", [
    (None, b'{"__metadata__":null,"model.layers.0.self_attn.q_proj.lora_a":{"data_offsets":['),
    ({"format": "mlx"}, b'{"__metadata__":{"format":"mlx"},"model.layers.0.'),
])
def test_mlx_lm_adapter_as_mlx_writes_it(tmp_path, metadata, starts):
    arrays = mlx_adapter(tmp_path / "mlx", metadata)
    file = tmp_path / "mlx" / "adapters.safetensors"
    assert header_text(file).startswith(starts) and b" " not in header_text(file)
    with safe_open(str(file), "np") as f:  # the reference reader accepts it: so must we
        assert (f.metadata() or {}) == (metadata or {})
    assert read_safetensors_header(file)["__metadata__"] == metadata
    a = load_adapter(tmp_path / "mlx")
    assert a.format == "mlx" and len(a) == 4 and {m.scaling for m in a} == {20.0}
    for m in a:
        la, lb = (arrays[f"{m.name}.lora_{x}"].astype(np.float64) for x in "ab")
        assert close(m, 20.0 * (la @ lb).T), m.name
    r = run("inspect", tmp_path / "mlx")
    assert r.exit_code == 0, r.output


# --- safetensors' own writers (PEFT folders, kohya files) ------------------------------------

def peft_tensors(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return {f"base_model.model.layers.0.{p}.lora_{x}.weight": torch.randn(*s, generator=g).to(dtype)
            for p in ("q", "v") for x, s in (("A", (2, 6)), ("B", (5, 2)))}


@pytest.mark.parametrize("writer, metadata", [
    ("torch", None), ("torch", {}), ("torch", {"format": "pt"}), ("numpy", None), ("numpy", {"format": "np"}),
])
def test_peft_folder_written_by_safetensors_writers(tmp_path, writer, metadata):
    import safetensors.numpy
    import safetensors.torch

    t = peft_tensors()
    file = tmp_path / "adapter_model.safetensors"
    if writer == "torch":
        safetensors.torch.save_file(t, file, metadata=metadata)
    else:
        safetensors.numpy.save_file({k: v.numpy() for k, v in t.items()}, file, metadata=metadata)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]}))
    text = header_text(file)
    assert (b'"__metadata__"' in text) == (metadata is not None)  # absent when the writer is given None
    assert len(text) % 8 == 0  # the Rust writer pads the header with spaces to 8 bytes
    a = load_adapter(tmp_path)
    assert {m.name for m in a} == {"layers.0.q", "layers.0.v"}
    for m in a:
        A, B = (t[f"base_model.model.{m.name}.lora_{x}.weight"].double() for x in "AB")
        assert close(m, 2.0 * B @ A)


def test_kohya_file_as_sd_scripts_saves_it(tmp_path):
    """sd-scripts' ``save_weights``: every tensor cast to the save dtype (alpha too, a 0-d tensor), ss_* metadata."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(2)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down, up = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(2.0)}
    sd = {k: v.detach().clone().to("cpu").to(torch.float16) for k, v in sd.items()}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
            "ss_training_comment": "None", "ss_tag_frequency": json.dumps({"1_x": {"a cat": 3}}),
            "sshs_model_hash": "0" * 64, "modelspec.architecture": "stable-diffusion-v1/lora"}
    save_file(sd, tmp_path / "k.safetensors", metadata=meta)
    a = load_adapter(tmp_path / "k.safetensors")
    assert a.format == "kohya" and a.metadata["ss_network_dim"] == "4"
    (m,) = list(a)
    assert m.scaling == 0.5
    assert close(m, 0.5 * sd[f"{stem}.lora_up.weight"].double() @ sd[f"{stem}.lora_down.weight"].double())


def test_diffusers_file_as_save_lora_weights_writes_it(tmp_path):
    pytest.importorskip("diffusers")
    peft = pytest.importorskip("peft")
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    g = torch.Generator().manual_seed(3)
    stem = "down_blocks.0.attentions.0.proj_in"
    layers = {f"{stem}.lora_A.weight": torch.randn(2, 8, generator=g),
              f"{stem}.lora_B.weight": torch.randn(8, 2, generator=g)}
    cfg = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["proj_in"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                                     unet_lora_adapter_metadata=cfg.to_dict())
    file = tmp_path / "pytorch_lora_weights.safetensors"
    assert b'"lora_adapter_metadata"' in header_text(file)
    a = load_adapter(tmp_path)
    (m,) = list(a)
    assert m.name == f"unet.{stem}" and m.scaling == 3.0
    assert close(m, 3.0 * layers[f"{stem}.lora_B.weight"].double() @ layers[f"{stem}.lora_A.weight"].double())


# --- what the header check still refuses ------------------------------------------------------

@pytest.mark.parametrize("metadata, needle", [
    (5, "is a JSON int"), ([], "is a JSON list"), ("pt", "is a JSON str"), ({"format": 1}, "non-string values"),
    ({"format": None}, "non-string values"),
])
def test_metadata_that_no_writer_writes_is_refused(tmp_path, metadata, needle):
    mlx_adapter(tmp_path / "mlx")
    file = tmp_path / "mlx" / "adapters.safetensors"
    blob = file.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    line = assert_bad_input(run("inspect", tmp_path / "mlx"), "adapters.safetensors", "'__metadata__'", needle)
    assert "expected null or an object of strings to strings" in line
