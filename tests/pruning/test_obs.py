import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.pruning.obs import Hessian, inverse_cholesky


def hessian_of(x: torch.Tensor) -> Hessian:
    h = Hessian(x.shape[-1])
    h.add_batch(x)
    return h


def test_hessian_is_mean_of_2xxt_over_batches() -> None:
    x = torch.randn(50, 12)
    h = Hessian(12)
    for chunk in x.split([7, 30, 13]):
        h.add_batch(chunk)
    torch.testing.assert_close(h.matrix, 2 * x.t() @ x / 50, rtol=1e-5, atol=1e-5)


def test_inputs_with_inf_or_nan_are_one_error_naming_the_layer() -> None:
    x = torch.randn(64, 16)
    x[3, 5] = float("inf")  # a float16 activation that overflowed
    with pytest.raises(
        SparseftError, match=r"inputs of model.layers.1.mlp.up_proj hold inf or NaN.*--dtype float32"
    ):
        inverse_cholesky(hessian_of(x).matrix, torch.randn(8, 16), 0.01, layer="model.layers.1.mlp.up_proj")


def test_a_hessian_that_is_not_positive_definite_is_one_error_naming_the_layer() -> None:
    hessian = torch.diag(torch.tensor([1.0, -4.0, 1.0, 1.0]))  # what rounding can leave of 2XXᵀ/n
    with pytest.raises(
        SparseftError, match="model.layers.0.self_attn.q_proj's inputs is not positive"
    ) as info:
        inverse_cholesky(hessian, torch.randn(4, 4), 0.01, layer="model.layers.0.self_attn.q_proj")
    message = str(info.value)
    assert "\n" not in message
    assert all(way in message for way in ("dampening", "--num-samples", "--dtype float32", "--ignore"))
