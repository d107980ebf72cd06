"""Plain-torch reference implementations of the kernels: what each C++ path must compute.

They are also the portable path when the C++ kernels cannot be built (correct, and much slower).
- bf16 values: y = bf16(x) . W in fp32 (the kernels round the activations to bf16 for vdpbf16ps).
- int8 values: per-token symmetric int8 activations (scale max|x| / 127, round half to even; 16-bit, / 32767, for
  long prompts on AMX), exact integer dot products, times both scales: the dequantized product (q_x s_x) . (q_w s_w).
- int4 values: the same per-token int8 activations, exact integer dot products per group of columns, each times
  its group's scale, summed in floating point.
"""

from __future__ import annotations

import torch

from sparseft.formats.bitmask import unpack_nibbles
from sparseft.runtime.packing import Packed


def unpack_mask(packed: Packed) -> torch.Tensor:
    """The (R, C) bool mask of the nonzeros."""
    rows, cols = packed.shape
    bits = packed.mask.view(torch.uint8).reshape(rows, -1, 1) >> torch.arange(8, dtype=torch.uint8)
    return (bits & 1).reshape(rows, -1)[:, :cols].bool()


def stored_values(packed: Packed) -> torch.Tensor:
    """The stored values, one element each (int4 nibbles as int8)."""
    if packed.kind != "int4":
        return packed.values[: packed.nnz]
    start = int(packed.row_start[0])
    return unpack_nibbles(packed.values, start + packed.nnz)[start:]


def group_scales(packed: Packed) -> torch.Tensor:
    """int4: the (R, C) float32 scale of every weight."""
    assert packed.scale is not None
    return packed.scale.float().repeat_interleave(packed.group_size, dim=1)[:, : packed.shape[1]]


def unpack(packed: Packed, integer: bool = False) -> torch.Tensor:
    """The dense float32 weight; for int8 and int4 values the dequantized weight, or the raw integers if
    `integer`."""
    keep = unpack_mask(packed)
    out = torch.zeros(packed.shape, dtype=torch.float64 if integer else torch.float32)
    values = stored_values(packed)
    if packed.kind == "int4" and not integer:
        out[keep] = values.float() * group_scales(packed)[keep]
    elif packed.kind == "int8" and not integer:
        assert packed.scale is not None
        rows = keep.nonzero()[:, 0]
        out[keep] = values.float() * packed.scale[rows]
    else:
        out[keep] = values.to(out.dtype)
    return out


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric integers of `bits` bits (as float values) and the per-token scale, over the last
    dimension."""
    x = x.float()
    levels = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, torch.round(x / safe).clamp(-levels, levels), torch.zeros_like(x))
    return q, scale


def sparse_mm(
    x: torch.Tensor, packed: Packed, bias: torch.Tensor | None = None, activation_bits: int = 8
) -> torch.Tensor:
    """y = x W^T (+ bias) as the kernels compute it, in x's dtype; int8 values take activations of
    `activation_bits` bits (16: the AMX kernel for long int8 prompts)."""
    if packed.kind == "int8":
        assert packed.scale is not None
        q, scale = quantize_activations(x, activation_bits)
        y = (q.double() @ unpack(packed, integer=True).T).float() * scale * packed.scale
    elif packed.kind == "int4":
        q, scale = quantize_activations(x, 8)
        # the integer sums are exact in float64; the group scales apply to whole sums
        w = unpack(packed, integer=True) * group_scales(packed).double()
        y = (q.double() @ w.T).float() * scale
    else:
        y = x.to(torch.bfloat16).float() @ unpack(packed).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def decompress(packed: Packed) -> torch.Tensor:
    """The dense bf16 weight (int8 values dequantized), as the large-batch path multiplies it."""
    return unpack(packed).to(torch.bfloat16)


def dense_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bf16 y = x W^T with fp32 accumulation."""
    y = x.to(torch.bfloat16).float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
