"""Weight quantization that keeps zeros zero: symmetric round-to-nearest, one scale per output channel (int8)
or per group of `group_size` consecutive input columns (int4).

Symmetric means no zero point: q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1) and w ≈ q · s, so a pruned weight
(exactly 0) quantizes to exactly 0 and the sparsity mask survives quantization unchanged. The scale is
s = max|w| / (2^(b-1) - 1) over the channel or group, rounded to the dtype it is stored in *before* the weights
are divided by it, so that dequantizing with the stored scale reproduces exactly what was quantized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparseft.errors import SparseftError

SCHEMES = ("int8", "int4")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: `bits` (8 or 4) and `group_size` (None: one scale per output channel)."""

    bits: int
    group_size: int | None = None

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    def groups(self, columns: int) -> int:
        return 1 if self.group_size is None else math.ceil(columns / self.group_size)

    def group_width(self, columns: int) -> int:
        return columns if self.group_size is None else self.group_size

    def describe(self) -> dict[str, int | bool | str | None]:
        strategy = "channel" if self.group_size is None else "group"
        return {"bits": self.bits, "group_size": self.group_size, "strategy": strategy, "symmetric": True}


DEFAULT_GROUP_SIZE = 128


def parse_quantize(scheme: str | None, group_size: int | None = None) -> QuantSpec | None:
    """int8 -> per channel 8 bits, int4 -> per group of `group_size` (default 128) 4 bits, None -> no
    quantization."""
    if scheme is None:
        return None
    if scheme == "int8":
        if group_size is not None:  # silently dropping it would export something other than asked for
            raise SparseftError("int8 is quantized per output channel; --group-size applies to int4 only")
        return QuantSpec(8, None)
    if scheme == "int4":
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size < 1:
            raise SparseftError(f"--group-size must be a positive number of columns, got {group_size}")
        return QuantSpec(4, group_size)
    raise SparseftError(f"unknown quantization {scheme!r}; use one of {', '.join(SCHEMES)}")


@dataclass
class QuantizedWeight:
    """Integers `q` (int8 tensor of the weight's (rows, columns) shape, in [qmin, qmax]) and `scale`
    (rows, groups) in the dtype it is stored in; weight ≈ q · scale."""

    q: torch.Tensor
    scale: torch.Tensor
    spec: QuantSpec

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.q, self.scale, self.spec, dtype)


def expand_scale(scale: torch.Tensor, spec: QuantSpec, columns: int) -> torch.Tensor:
    """The per-weight scale, (rows, columns) in float32: group g covers columns [g·size, (g+1)·size)."""
    width = spec.group_width(columns)
    return scale.to(torch.float32).repeat_interleave(width, dim=1)[:, :columns]


def absmax_scale(weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """max|w| / qmax per channel or group, rounded to `dtype`; all-zero groups get scale 1 (their q is 0)."""
    rows, columns = weight.shape
    width = spec.group_width(columns)
    padded = torch.nn.functional.pad(weight.detach().abs().to(torch.float32), (0, (-columns) % width))
    amax = padded.reshape(rows, -1, width).amax(dim=2)
    scale = (amax / spec.qmax).to(dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(weight: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round w / s to the nearest integer (half to even) and clamp to the signed range; int8 result."""
    s = expand_scale(scale, spec, weight.shape[1])
    q = torch.round(weight.detach().to(torch.float32) / s).clamp_(spec.qmin, spec.qmax)
    return q.to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * expand_scale(scale, spec, q.shape[1])).to(dtype)


def rtn_quantize(
    weight: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Round-to-nearest with absmax scales; `scale_dtype` defaults to the weight's dtype."""
    scale = absmax_scale(weight, spec, scale_dtype or weight.dtype)
    return QuantizedWeight(quantize(weight, scale, spec), scale, spec)
