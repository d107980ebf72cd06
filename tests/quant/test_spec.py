import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.quant.model import relative_error
from sparseft.quant.spec import QuantSpec, dequantize, expand_scale, parse_quantize, rtn_quantize


def pruned_weight(rows: int = 48, cols: int = 100, sparsity: float = 0.7, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return magnitude_prune(weight, sparsity)


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rtn_keeps_zeros_and_stays_within_half_a_step(spec: QuantSpec, dtype: torch.dtype) -> None:
    weight = pruned_weight().to(dtype)
    quantized = rtn_quantize(weight, spec)
    approx = quantized.dequantize(torch.float32)

    assert quantized.q.dtype == torch.int8 and quantized.scale.dtype == dtype
    assert quantized.scale.shape == (48, spec.groups(100))
    assert int(quantized.q.min()) >= spec.qmin and int(quantized.q.max()) <= spec.qmax
    assert bool((approx[weight == 0] == 0).all())
    step = expand_scale(quantized.scale, spec, 100)
    assert bool(((approx - weight.float()).abs() <= step / 2 * (1 + 1e-2)).all())


def test_scale_is_absmax_over_each_group_and_groups_may_be_partial() -> None:
    weight = pruned_weight(4, 70)
    spec = QuantSpec(4, 32)
    quantized = rtn_quantize(weight, spec)
    for group, (lo, hi) in enumerate([(0, 32), (32, 64), (64, 70)]):
        amax = weight[:, lo:hi].abs().amax(dim=1)
        assert torch.allclose(quantized.scale[:, group], amax / 7)
    # the largest weight of each group is represented exactly (q = ±7)
    assert bool((quantized.q.abs().amax(dim=1) == 7).all())


def test_all_zero_group_gets_a_harmless_scale() -> None:
    weight = torch.zeros(3, 16)
    weight[0, 0] = 1.0
    quantized = rtn_quantize(weight, QuantSpec(8))
    assert torch.equal(quantized.dequantize(torch.float32), weight)
    assert bool((quantized.scale[1:] == 1).all())


def test_int8_error_is_far_below_int4_error() -> None:
    weight = pruned_weight()
    e8 = relative_error(weight, rtn_quantize(weight, QuantSpec(8)).dequantize(torch.float32))
    e4 = relative_error(weight, rtn_quantize(weight, QuantSpec(4, 32)).dequantize(torch.float32))
    assert 0 < e8 < e4 / 50 < 1


def test_relative_error_with_a_hessian_weights_the_columns() -> None:
    weight = torch.ones(2, 2)
    approx = weight.clone()
    approx[:, 1] = 0
    assert relative_error(weight, approx) == pytest.approx(0.5)
    assert relative_error(weight, approx, torch.diag(torch.tensor([1.0, 0.0]))) == pytest.approx(0.0)


def test_dequantize_is_the_product_of_integers_and_scales() -> None:
    q = torch.tensor([[1, -2, 3, 0]], dtype=torch.int8)
    scale = torch.tensor([[0.5, 2.0]])
    assert dequantize(q, scale, QuantSpec(4, 2), torch.float32).tolist() == [[0.5, -1.0, 6.0, 0.0]]


def test_parse_quantize() -> None:
    assert parse_quantize(None) is None
    assert parse_quantize("int8") == QuantSpec(8, None)
    assert parse_quantize("int4", 64) == QuantSpec(4, 64)
    assert parse_quantize("int4") == QuantSpec(4, 128)
    with pytest.raises(SparseftError, match="--group-size applies to int4 only"):
        parse_quantize("int8", 64)  # not dropped without a word
    with pytest.raises(SparseftError, match="unknown quantization 'fp8'"):
        parse_quantize("fp8")
    with pytest.raises(SparseftError, match="group-size"):
        parse_quantize("int4", 0)
