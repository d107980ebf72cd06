"""`SparseLinear`: a drop-in for `nn.Linear` whose weight exists only compressed (bitmask + packed values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.runtime import dispatch
from sparseft.runtime.packing import Packed, Values, pack_bitmask, pack_dense

_INPUT_DTYPES = (torch.float32, torch.bfloat16)


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored as a bitmask and its nonzeros (bf16, int8 with per-row scales, or int4 with
    per-group scales).

    Build it with `from_linear` (a pruned dense layer) or `from_bitmask` (the archive's tensors). Inputs are
    float32 or bfloat16 CPU tensors of any leading shape; the output has the input's dtype.
    """

    mask: torch.Tensor
    values: torch.Tensor
    row_start: torch.Tensor
    scale: torch.Tensor | None
    rowsum: torch.Tensor | None
    bias: torch.Tensor | None
    # There is no dense weight. Model code that peeks at `layer.weight` (T5 checks `wo.weight.dtype` when it is a
    # tensor) then takes its path for layers without one.
    weight = None

    def __init__(self, packed: Packed, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features = packed.shape[1]
        self.out_features = packed.shape[0]
        if bias is not None and bias.numel() != self.out_features:
            raise SparseftError(f"bias has {bias.numel()} entries for {self.out_features} outputs")
        if not packed.checked:
            dispatch.check_packed(packed)
        # Buffers, so .to(device) moves them; not in the state dict, whose layout belongs to the archive.
        for name in ("mask", "values", "row_start", "scale", "rowsum"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().contiguous(), persistent=False
        )
        self.group_size = packed.group_size
        self._packed: Packed | None = None

    @classmethod
    def from_linear(
        cls, linear: nn.Module, values: Values = "bf16", name: str = "linear", group_size: int | None = None
    ) -> SparseLinear:
        """Compress a (pruned) `nn.Linear`; its zeros are the entries left out. int4 values are quantized per
        group of `group_size` input columns (default 128)."""
        if not isinstance(linear, nn.Linear):
            raise SparseftError(f"{name}: SparseLinear replaces nn.Linear, got {type(linear).__name__}")
        return cls(pack_dense(linear.weight.detach(), values, name, group_size=group_size), linear.bias)

    @classmethod
    def from_bitmask(
        cls,
        shape: torch.Tensor | tuple[int, int],
        compressed: torch.Tensor,
        bitmask: torch.Tensor,
        row_offsets: torch.Tensor,
        bias: torch.Tensor | None = None,
        values: Values = "bf16",
        scale: torch.Tensor | None = None,
        name: str = "linear",
        group_size: int | None = None,
    ) -> SparseLinear:
        """From the bitmask archive's tensors of one weight (the layout in sparseft/formats.py)."""
        return cls(
            pack_bitmask(shape, compressed, bitmask, row_offsets, values, scale, name, group_size), bias
        )

    @property
    def packed(self) -> Packed:
        if self._packed is None:  # built once: forward runs per token and every microsecond shows
            self._packed = Packed(
                (self.out_features, self.in_features),
                self.mask,
                self.values,
                self.row_start,
                self.scale,
                self.rowsum,
                checked=True,
                group_size=self.group_size,
            )
        return self._packed

    @property
    def kind(self) -> Values:
        return self.packed.kind

    def density(self) -> float:
        return self.packed.nnz / max(self.in_features * self.out_features, 1)

    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * 4
        return self.packed.nbytes() + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _INPUT_DTYPES:
            raise SparseftError(
                f"SparseLinear takes float32 or bfloat16 inputs, got {x.dtype}; cast the input or the model"
            )
        if x.shape[-1] != self.in_features:
            raise SparseftError(
                f"SparseLinear expects {self.in_features} input features, got shape {tuple(x.shape)}"
            )
        if x.device != self.values.device:
            raise SparseftError(
                f"input is on {x.device} but the SparseLinear weights are on {self.values.device}"
            )
        return dispatch.linear(x, self.packed, self.bias)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> SparseLinear:
        # model.to(dtype) / .half() must not convert the packed layout: buffers may move, never change dtype
        # (a round trip through a narrower dtype would also lose the fp32 bias's precision).
        for name, tensor in self._buffers.items():
            if tensor is not None:
                moved = fn(tensor)
                self._buffers[name] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        self._packed = None
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, values={self.kind}, "
            f"density={self.density():.3f}, bias={self.bias is not None}"
        )


class DenseLinear(nn.Module):
    """A dense bf16 `nn.Linear` (the LM head) that decodes with sparseft's AVX-512 GEMV, which reads the weight
    near memory speed where torch's CPU GEMV does not; larger inputs use torch. Shares the wrapped weight."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.numel() // max(self.in_features, 1)
        w = self.weight
        if (
            tokens > dispatch.dense_above("dense")
            or x.dtype not in _INPUT_DTYPES
            or w.dtype != torch.bfloat16
            or x.device.type != "cpu"
        ):
            return nn.functional.linear(
                x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype)
            )
        # read per call, so that a bias loaded or edited later is the one used
        bias = None if self.bias is None else self.bias.detach().float()
        return dispatch.dense_mm(x, w.detach(), bias)
