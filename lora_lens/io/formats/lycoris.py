"""LyCORIS LoKr and LoHa (also PEFT's ports of them) in factored form ``ΔW = s · B A``.

Neither is ``s·B·A`` as stored, but both are low-rank products of low-rank
factors, so they are rewritten exactly as one pair without forming ΔW:

- **LoKr** ``ΔW = s · kron(W₁, W₂)``, each ``Wᵢ = Bᵢ Aᵢ`` (stored as ``lokr_wi_a``
  (aᵢ, rᵢ) and ``lokr_wi_b`` (rᵢ, bᵢ), or a full ``lokr_wi`` (aᵢ, bᵢ), written as
  ``I·W`` or ``W·I``, whichever has the smaller inner size). The mixed-product
  rule ``kron(B₁A₁, B₂A₂) = kron(B₁, B₂) · kron(A₁, A₂)`` gives
  ``B (a₁a₂, r₁r₂)`` and ``A (r₁r₂, b₁b₂)``: rank at most r₁·r₂. A Conv2d
  ``W₂ (a₂, b₂, kh, kw)`` is flattened to ``(a₂, b₂·kh·kw)``; the Kronecker
  column index ``j₁·b₂·kk + j₂·kk + t`` is then exactly the flattened
  ``(in = j₁·b₂ + j₂, t)`` of the conv kernel.
- **LoHa** ``ΔW = s · (B₁A₁) ⊙ (B₂A₂)`` (``hada_w1_a`` = B₁ (m, r₁), ``hada_w1_b``
  = A₁ (r₁, n), …). With the row-wise Kronecker (face-splitting) product
  ``(B₁ ⊙ᵣ B₂)[i, (p, q)] = B₁[i, p] B₂[i, q]`` and its column-wise twin
  ``(A₁ ⊙ᶜ A₂)[(p, q), j] = A₁[p, j] A₂[q, j]``,
  ``Σ_{p,q} B₁[i,p] B₂[i,q] A₁[p,j] A₂[q,j] = (B₁A₁)[i,j] (B₂A₂)[i,j]``, so
  ``B = B₁ ⊙ᵣ B₂ (m, r₁r₂)`` and ``A = A₁ ⊙ᶜ A₂ (r₁r₂, n)``.

Costs: ``O((m + n) r₁r₂)`` memory instead of ``m·n``; every later stage (the
factored SVD, φ, alignment) works on them unchanged.

Dtype: ``B`` and ``A`` are float32 for half-precision files (the stored dtype,
the wider of the two factors', for float32/float64 files). Each of their entries
is one product of two stored numbers, and float32 holds such a product exactly
(2·11 significand bits for fp16, 2·8 for bf16; fp16 subnormals are normal
numbers in float32), so the rewrite stays exact at 2× the memory of an fp16
file. Rounding the products back to fp16/bf16 would lose up to one unit
round-off per entry; float64 would cost 4× (≈6 GB of RSS for an SDXL-sized
LoKr) for digits float32 already holds.
"""

from __future__ import annotations

import re

import torch


def full_as_product(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full ``W (a, b)`` as ``B A`` with the smaller inner size: ``(I_a, W)`` or ``(W, I_b)``."""
    a, b = W.shape
    if a <= b:
        return torch.eye(a, dtype=W.dtype), W
    return W, torch.eye(b, dtype=W.dtype)


def _common(*ts: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in their widest dtype, at least float32 (products of half-precision numbers are exact there)."""
    dtype = torch.float32
    for t in ts:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in ts]


def kron_factors(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``kron(B₁A₁, B₂A₂) = kron(B₁, B₂) · kron(A₁, A₂)``: ``B (a₁a₂, r₁r₂)``, ``A (r₁r₂, b₁b₂)``, exact (see the module docstring)."""
    return torch.kron(*_common(B1, B2)), torch.kron(*_common(A1, A2))


def face_split_factors(B1: torch.Tensor, A1: torch.Tensor, B2: torch.Tensor, A2: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B₁A₁) ⊙ (B₂A₂) = (B₁ ⊙ᵣ B₂)(A₁ ⊙ᶜ A₂)``: ``B (m, r₁r₂)``, ``A (r₁r₂, n)``."""
    B1, B2 = _common(B1, B2)
    A1, A2 = _common(A1, A2)
    m, r1 = B1.shape
    r2 = B2.shape[1]
    B = (B1[:, :, None] * B2[:, None, :]).reshape(m, r1 * r2)  # (m, r1, r2) → (m, r1·r2)
    A = (A1[:, None, :] * A2[None, :, :]).reshape(r1 * r2, A1.shape[1])  # (r1, r2, n) → (r1·r2, n)
    return B, A


#: Suffixes of the tensors of one LoKr / LoHa module.
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
#: Tucker cores: a further factorization of conv kernels that is not read.
TUCKER_KEYS = ("lokr_t1", "lokr_t2", "hada_t1", "hada_t2", "lora_mid")


def lokr_parts(get, have: set[str]) -> tuple[torch.Tensor, torch.Tensor, int, bool, tuple[int, ...]]:
    """``(B, A, dim, both_full, kernel)`` of a LoKr module from its tensors (``get(suffix)`` reads one).

    ``dim`` is the stored low rank (``lokr_w*_b``'s rows; 0 when both factors
    are full, where LyCORIS uses scale 1). Conv ``lokr_w2`` is flattened; ``kernel`` is its ``(kh, kw)``.
    """
    parts, dim, kernel = [], 0, ()
    for i in ("1", "2"):
        if f"lokr_w{i}" in have:
            W = get(f"lokr_w{i}")
            kernel = tuple(int(k) for k in W.shape[2:]) or kernel
            parts.append(full_as_product(W.reshape(W.shape[0], -1)))
        else:
            a, b = get(f"lokr_w{i}_a"), get(f"lokr_w{i}_b")
            dim = int(b.shape[0])
            kernel = tuple(int(k) for k in b.shape[2:]) or kernel  # a conv w2_b is (r, in, kh, kw)
            parts.append((a, b.reshape(b.shape[0], -1)))
    (B1, A1), (B2, A2) = parts
    B, A = kron_factors(B1, A1, B2, A2)
    return B, A, dim, dim == 0, kernel


def loha_parts(get) -> tuple[torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    """``(B, A, dim, kernel)`` of a LoHa module; ``dim`` = r of ``hada_w1_b``; ``kernel`` is ``()`` unless a
    ``hada_w*_b`` is stored 4-D ``(r, in, kh, kw)`` (LyCORIS and PEFT write a conv's flattened, 2-D)."""
    B1, A1 = get("hada_w1_a"), get("hada_w1_b")
    B2, A2 = get("hada_w2_a"), get("hada_w2_b")
    kernel = tuple(int(k) for k in A1.shape[2:]) or tuple(int(k) for k in A2.shape[2:])
    B, A = face_split_factors(B1, A1.reshape(A1.shape[0], -1), B2, A2.reshape(A2.shape[0], -1))
    return B, A, int(A1.shape[0]), kernel


#: diffusers' Conv2d modules (UNet2DConditionModel, AutoencoderKL, ControlNet): ResnetBlock2D's
#: ``conv1`` / ``conv2`` / ``conv_shortcut``, Downsample2D / Upsample2D's ``conv``, ``conv_in`` / ``conv_out``.
#: ``proj_in`` / ``proj_out`` are not here: a Conv2d 1×1 in SD 1.x, a Linear in SD 2 / SDXL.
DIFFUSERS_CONV = re.compile(r"(?:^|\.)(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut)|(?:downsamplers|upsamplers)\.\d+\.conv"
                            r"|conv_in|conv_out)$")
#: Flag of conv modules whose kernel size the file does not give.
KERNEL_UNKNOWN = "kernel-unknown"


def conv_layout(name: str, kernel: tuple[int, ...], dora_scale: torch.Tensor | None = None) -> str | None:
    """``"conv"`` for a LoKr / LoHa on a Conv, else None (the factors' shapes decide: ``linear``).

    LyCORIS and PEFT store a LoHa, and a LoKr's factored ``w2``, on a Conv2d as 2-D factors
    ``(r, in·kh·kw)`` (``LohaModule`` / ``LokrModule``, not Tucker): the numbers are ΔW flattened, but only a
    4-D tensor says it is a conv (and its kernel). Otherwise a conv is known from a 4-D ``dora_scale``
    ``(out, 1, 1, 1)`` or from a diffusers Conv2d module path (:data:`DIFFUSERS_CONV`), its kernel
    unknown (``()``) until a base gives it (:func:`lora_lens.io.layout.with_base_layouts`).
    """
    if kernel or (dora_scale is not None and dora_scale.dim() > 2) or DIFFUSERS_CONV.search(name):
        return "conv"
    return None


def kernel_unknown_flags(modules) -> list[str]:
    """One flag naming the conv modules whose kernel the file stores flattened."""
    unknown = [m.name for m in modules if m.layout == "conv" and not m.kernel]
    if not unknown:
        return []
    return [f"{KERNEL_UNKNOWN}: {len(unknown)} conv module(s) ({', '.join(unknown[:2])}{' …' if len(unknown) > 2 else ''}) "
            "store their kernel flattened (ΔW as (out, in·kh·kw), exact); the kernel size is read from the base "
            "when one is given (--base)."]
