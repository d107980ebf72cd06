from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft.errors import SparseftError
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.pruning.obs import Hessian
from sparseft.quant.gptq import gptq_quantize
from sparseft.quant.model import quantize_model, relative_error
from sparseft.quant.spec import QuantSpec, rtn_quantize


def correlated_hessian(columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs that live mostly in a low-dimensional subspace, as real activations do."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 12, generator=gen) @ torch.randn(12, columns, generator=gen)
    x += 0.05 * torch.randn(2048, columns, generator=gen)
    hessian = Hessian(columns)
    hessian.add_batch(x)
    return hessian.matrix


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 16)])
def test_gptq_beats_rtn_on_correlated_inputs_and_keeps_the_mask(spec: QuantSpec) -> None:
    columns = 96
    hessian = correlated_hessian(columns)
    weight = magnitude_prune(torch.randn(40, columns, generator=torch.Generator().manual_seed(1)), 0.6)
    gptq = gptq_quantize(weight, hessian, spec)
    rtn = rtn_quantize(weight, spec)

    assert gptq.q.dtype == torch.int8 and gptq.scale.shape == rtn.scale.shape
    assert int(gptq.q.min()) >= spec.qmin and int(gptq.q.max()) <= spec.qmax
    assert bool((gptq.q[weight == 0] == 0).all())
    gptq_error = relative_error(weight, gptq.dequantize(torch.float32), hessian)
    rtn_error = relative_error(weight, rtn.dequantize(torch.float32), hessian)
    assert gptq_error < rtn_error


def test_gptq_on_uncorrelated_inputs_is_close_to_rtn() -> None:
    # With H = I there is nothing to compensate through: GPTQ reduces to rounding to nearest.
    weight = magnitude_prune(torch.randn(8, 64, generator=torch.Generator().manual_seed(2)), 0.5)
    gptq = gptq_quantize(weight, torch.eye(64), QuantSpec(8), dampening=0.0)
    assert torch.equal(gptq.q, rtn_quantize(weight, QuantSpec(8)).q)


def test_gptq_zeroes_dead_inputs() -> None:
    hessian = correlated_hessian(32)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    weight = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    gptq = gptq_quantize(weight, hessian, QuantSpec(4, 8))
    assert bool((gptq.q[:, 5] == 0).all())


def test_quantize_model_gptq_runs_block_by_block(make_model_dir: Callable[..., Path]) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model_dir("llama")).eval()
    targets = find_targets(model)
    for module in targets.values():
        weight_matrix(module).copy_(magnitude_prune(weight_matrix(module), 0.5))
    pruned = {name: weight_matrix(m) == 0 for name, m in targets.items()}
    samples = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    quantized, errors = quantize_model(model, targets, QuantSpec(4, 32), "gptq", samples, progress=False)

    assert quantized.keys() == targets.keys()
    for name, module in targets.items():
        weight = weight_matrix(module)
        assert torch.equal(weight, quantized[name].dequantize(weight.dtype))
        assert bool((weight[pruned[name]] == 0).all())
        assert set(errors[name]) == {
            "gptq_weight_error",
            "rtn_weight_error",
            "gptq_output_error",
            "rtn_output_error",
        }
    mean = {
        key: sum(e[key] for e in errors.values()) / len(errors)
        for key in ("gptq_output_error", "rtn_output_error")
    }
    assert mean["gptq_output_error"] < mean["rtn_output_error"]
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_a_hessian_that_is_not_positive_definite_is_one_error_naming_the_layer() -> None:
    hessian = torch.diag(torch.tensor([1.0, -4.0, 1.0, 1.0]))
    with pytest.raises(SparseftError, match="model.layers.0.mlp.down_proj's inputs is not positive definite"):
        gptq_quantize(torch.randn(4, 4), hessian, QuantSpec(8), layer="model.layers.0.mlp.down_proj")
