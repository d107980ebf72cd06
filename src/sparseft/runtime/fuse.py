"""Sibling linears that read the same input, run as one kernel call: q/k/v of a self-attention, gate/up of a
gated MLP.

Decoding calls every linear once per token, and each call cost 15-20 µs before a weight was read when this was
measured (Python, torch's op dispatcher, since replaced by a pybind11 binding, waking the threads), while a
grouped-query model's k and v projections hold only a fraction of a megabyte each. One `SparseLinear` over the
stacked rows serves the whole group: the first member called computes every row, and the others slice that result
while their input is the same tensor. Every transformers attention and MLP calls the members back to back on one
tensor; in a cross-attention they read different tensors, so only modules named `self_attn` and `mlp` are fused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparseft.hf import replace_module
from sparseft.runtime.heap import release_freed_memory
from sparseft.runtime.linear import SparseLinear
from sparseft.runtime.packing import concat_rows

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


def _version(x: torch.Tensor) -> int | None:
    # Inference tensors keep no version counter; identity alone then vouches that the input is unchanged.
    return None if x.is_inference() else x._version


class _Memo:
    """The last input, its version and the output, with how many members have taken their rows. A plain object:
    setting an attribute of an nn.Module costs microseconds (it checks for parameters and submodules), and this
    changes on every call."""

    __slots__ = ("x", "version", "y", "served")

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.version: int | None = None
        self.y: torch.Tensor | None = None
        self.served = 0


class Stacked(nn.Module):
    """The stacked linear of a group of `members`, remembering its last input and output until every member has
    taken its rows (then nothing is held: after a long prompt, every layer holding its output would add up)."""

    def __init__(self, linear: SparseLinear, members: int) -> None:
        super().__init__()
        self.linear = linear
        self.members = members
        self._memo = _Memo()

    def output(self, x: torch.Tensor) -> torch.Tensor:
        memo = self._memo
        y = memo.y
        if y is not None and memo.x is x and memo.version == _version(x):
            memo.served += 1
        else:
            y = self.linear(x)
            memo.x, memo.version, memo.y, memo.served = x, _version(x), y, 1
        if memo.served >= self.members:
            memo.x = memo.y = None
        return y


class Slice(nn.Module):
    """One member of a fused group: rows [start, stop) of the stacked output. Stands in for the SparseLinear it
    replaced (same features, `kind`, `density`), without a dense `weight`."""

    weight = None

    def __init__(self, stacked: Stacked, start: int, stop: int) -> None:
        super().__init__()
        self.stacked = stacked
        self._output = stacked.output  # a plain attribute: submodules are looked up the slow way
        self.start, self.stop = start, stop
        self.in_features = stacked.linear.in_features
        self.out_features = stop - start

    @property
    def kind(self) -> str:
        return self.stacked.linear.kind

    def density(self) -> float:
        p = self.stacked.linear.packed
        nnz = int(p.row_start[self.stop] - p.row_start[self.start])
        return nnz / max(self.in_features * self.out_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A copy, not a view: model code may reshape it freely or change it in place without touching the
        # remembered output the other members slice.
        return self._output(x)[..., self.start : self.stop].contiguous()

    def extra_repr(self) -> str:
        return f"rows {self.start}:{self.stop} of a fused {self.stacked.linear.out_features}-row linear"


def fuse_siblings_(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group of SparseLinears (same input size and value kind) in place; returns how
    many groups were fused. A member without a bias (Whisper's k_proj) gets zeros in the stacked bias."""
    fused = 0
    # Only the parents are listed: a list holding the members too would keep every replaced weight alive until
    # the end, doubling the peak memory of a model being loaded.
    parents = [(n, m) for n, m in model.named_modules() if n.rpartition(".")[2] in GROUPS]
    for parent_name, parent in parents:
        names = GROUPS[parent_name.rpartition(".")[2]]
        members: list[Any] = [getattr(parent, n, None) for n in names]
        if not all(isinstance(m, SparseLinear) for m in members):
            continue
        first = members[0]
        if any(m.in_features != first.in_features or m.kind != first.kind for m in members):
            continue
        biases = [m.bias for m in members if m.bias is not None]
        bias = None
        if biases:
            bias = torch.cat(
                [m.bias if m.bias is not None else biases[0].new_zeros(m.out_features) for m in members]
            )
        stacked = Stacked(SparseLinear(concat_rows([m.packed for m in members]), bias), len(members))
        start = 0
        for name, member in zip(names, members, strict=True):
            replace_module(parent, name, Slice(stacked, start, start + member.out_features))
            start += member.out_features
        del members, member
        release_freed_memory()
        fused += 1
    return fused
