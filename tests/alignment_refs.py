"""Independent float64 references for the alignment and intruder tests (LoRA §7.3, materialized, numpy)."""

import numpy as np
import torch


def ref_alignment(module, W0: np.ndarray) -> dict:
    """§7.3 by hand: materialize ΔW, numpy SVDs, float64."""
    dW = module.delta(torch.float64).numpy()
    r = module.rank
    U, S, Vh = np.linalg.svd(dW)
    proj = np.linalg.norm(U[:, :r].T @ W0 @ Vh[:r].T)
    s0 = np.linalg.svd(W0, compute_uv=False)
    return {
        "delta_norm": np.linalg.norm(dW), "w0_norm": np.linalg.norm(W0), "proj_delta": proj,
        "proj_w0": np.sqrt(np.sum(s0[:r] ** 2)), "amplification": np.linalg.norm(dW) / proj,
    }


def base_matrix(state: dict, weight: str, layout: str) -> np.ndarray:
    W = state[weight].double().numpy()
    return W.T if layout == "conv1d" else W  # Conv1D stores (n, m)
