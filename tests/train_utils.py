"""Helpers shared by the trainer tests: reference logits, PEFT loading, init folders written by hand."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_lens.io import (
    THETA_NAME,
    InitDescription,
    atomic_save_safetensors,
    save_peft_adapter,
    write_init_description,
)
from lora_lens.keys import parse_module_path
from lora_lens.train.models import logits_of
from lora_lens.types import LoraModule

# Small settings so that every trainer test runs in a fraction of a second.
FAST = dict(steps=6, batch_size=4, seq_len=16, lr=1e-2)


def load_hf(folder: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def token_ids(vocab: int, seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids, dtype=None) -> torch.Tensor:
    """Logits in eval mode; with ``dtype`` a copy of the model is cast first (the model is left alone)."""
    if dtype is not None:
        import copy

        model = copy.deepcopy(model).to(dtype)
    was = model.training
    model.eval()
    out = logits_of(model, ids)
    model.train(was)
    return out


@torch.no_grad()
def peft_logits(base_folder: Path, adapter_folder: Path, ids, dtype=None) -> torch.Tensor:
    """Logits of PEFT's own PeftModel on a fresh base; fails on missing/unexpected adapter keys."""
    import warnings

    import peft

    from lora_lens import load_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(load_hf(base_folder), str(adapter_folder)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == set(load_adapter(adapter_folder).names)  # every saved module was used, nothing unexpected
    if dtype is not None:
        pm = pm.to(dtype)
    return pm(ids).logits


def target_weights(folder: Path, types: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``{module path: W0 (m, n)}`` of a HF folder's Linear targets, in PyTorch layout."""
    model = load_hf(folder)
    return {p: m.weight.detach().clone() for p, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and any(p.endswith("." + t) for t in types)}


def write_cora_init(folder: Path, base_folder: Path, rank: int = 4, alpha: float = 8.0, mode: str = "frozen",
                    seed: int = 0, types=("q_proj", "v_proj")) -> dict[str, torch.Tensor]:
    """A CoRA init folder following lora_lens/io/initfile.py: PEFT adapter (B = random orthonormal basis,
    A = 0) + lora_lens_init.json. Returns ``{module path: B}``."""
    gen = torch.Generator().manual_seed(seed)
    modules, basis = [], {}
    for path, W in target_weights(base_folder, types).items():
        m, n = W.shape
        B, _ = torch.linalg.qr(torch.randn(m, rank, generator=gen))
        basis[path] = B
        modules.append(LoraModule(path, parse_module_path(path), torch.zeros(rank, n), B, alpha, alpha / rank))
    save_peft_adapter(folder, modules)
    write_init_description(folder, InitDescription(
        method="cora", rank=rank, alpha=alpha, targets=sorted({parse_module_path(p).module for p in basis}),
        mode=mode, frozen=["lora_B"] if mode == "frozen" else [], peft_adapter=".",
    ))
    return basis


def write_condlora_init(folder: Path, shapes: dict[str, tuple[int, int]], rank: int = 4, alpha: float = 8.0,
                        mode: str = "general", seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A CondLoRA init folder: condlora_theta.safetensors ("<type>.theta_A/B") + lora_lens_init.json.
    Θ_B is non-zero on purpose, so the init visibly changes the model."""
    gen = torch.Generator().manual_seed(seed)
    theta, tensors = {}, {}
    for t, (m, n) in shapes.items():
        a_shape, b_shape = ((rank, n), (rank, n)) if mode == "official" else ((m, rank), (n, rank))
        theta[t] = (0.1 * torch.randn(a_shape, generator=gen), 0.1 * torch.randn(b_shape, generator=gen))
        tensors[f"{t}.theta_A"], tensors[f"{t}.theta_B"] = theta[t]
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, folder / THETA_NAME)
    write_init_description(folder, InitDescription(
        method="condlora", rank=rank, alpha=alpha, targets=list(shapes), mode=mode, peft_adapter=None,
        theta_file=THETA_NAME,
    ))
    return theta
