"""SparseLinear is a drop-in for nn.Linear and refuses bad input with a clear message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.runtime import DenseLinear, SparseLinear
from sparseft.runtime.dispatch import available_isas


def _pruned_linear(inputs: int = 70, outputs: int = 45, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(inputs, outputs, bias=bias)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.6] = 0
    return linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drop_in_for_linear(dtype: torch.dtype) -> None:
    linear = _pruned_linear()
    sparse = SparseLinear.from_linear(linear)
    assert (sparse.in_features, sparse.out_features) == (70, 45)
    assert abs(sparse.density() - linear.weight.count_nonzero().item() / linear.weight.numel()) < 1e-9
    x = torch.randn(2, 3, 70).to(dtype)
    y = sparse(x)
    assert y.shape == (2, 3, 45) and y.dtype == dtype
    expected = nn.functional.linear(x.bfloat16().float(), linear.weight.bfloat16().float(), linear.bias)
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2)
    assert sparse.nbytes() < linear.weight.numel() * 2  # smaller than the dense bf16 weight


def test_int8_is_close_to_dense() -> None:
    linear = _pruned_linear(bias=False)
    sparse = SparseLinear.from_linear(linear, "int8")
    assert sparse.kind == "int8"
    x = torch.randn(4, 70)
    exact = linear(x)
    assert ((sparse(x) - exact).norm() / exact.norm()).item() < 0.02


def test_dtype_casts_keep_the_packed_layout() -> None:
    sparse = SparseLinear.from_linear(_pruned_linear())
    model = nn.Sequential(sparse).to(torch.float16)
    assert model[0].values.dtype == torch.bfloat16 and model[0].bias.dtype == torch.float32
    x = torch.randn(1, 70)
    assert torch.equal(model[0](x), SparseLinear.from_linear(_pruned_linear())(x))


def test_bad_input_is_refused() -> None:
    sparse = SparseLinear.from_linear(_pruned_linear())
    with pytest.raises(SparseftError, match="float32 or bfloat16"):
        sparse(torch.randn(1, 70).half())
    with pytest.raises(SparseftError, match="expects 70 input features"):
        sparse(torch.randn(1, 71))
    with pytest.raises(SparseftError, match="on meta"):
        sparse(torch.empty(1, 70, device="meta"))
    with pytest.raises(SparseftError, match="replaces nn.Linear"):
        SparseLinear.from_linear(nn.Conv2d(3, 3, 1))  # type: ignore[arg-type]
    with pytest.raises(SparseftError, match="bias has 3 entries"):
        SparseLinear(SparseLinear.from_linear(_pruned_linear()).packed, torch.zeros(3))


@pytest.mark.parametrize("isa", available_isas())
def test_dense_linear_matches_torch(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEFT_ISA", isa)
    linear = _pruned_linear().to(torch.bfloat16)
    head = DenseLinear(linear)
    assert head.weight is linear.weight  # shared, e.g. with tied embeddings
    for shape in [(1, 70), (1, 1, 70), (40, 70)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(head(x), linear(x), rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        linear.bias.add_(1.0)  # a bias changed after wrapping is the one used
    x = torch.randn(1, 70, dtype=torch.bfloat16)
    torch.testing.assert_close(head(x), linear(x), rtol=2e-2, atol=2e-2)


def test_int8_archive_scales_given_as_a_strided_view_are_read_right() -> None:
    from sparseft.runtime.packing import bitmask_of

    linear = _pruned_linear()
    parts = bitmask_of(linear.weight.detach())
    q = torch.randint(-127, 128, parts["compressed"].shape, dtype=torch.int8)
    scales = torch.rand(45, 3)  # a column of a wider tensor: stride 3
    strided = SparseLinear.from_bitmask(
        parts["shape"], q, parts["bitmask"], parts["row_offsets"], None, "int8", scales[:, 0]
    )
    plain = SparseLinear.from_bitmask(
        parts["shape"], q, parts["bitmask"], parts["row_offsets"], None, "int8", scales[:, 0].clone()
    )
    x = torch.randn(2, 70)
    assert torch.equal(strided(x), plain(x))
