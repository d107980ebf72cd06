"""Llama-style RMSNorms run as one C++ op and round as transformers' LlamaRMSNorm does."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from sparseft.runtime import dispatch
from sparseft.runtime.norm import FusedRMSNorm, fuse_norms_

needs_kernels = pytest.mark.skipif(
    dispatch.best_isa() == "torch", reason="the C++ kernels are not built here"
)


def _norm(dtype: torch.dtype, hidden: int = 200) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(1)))
    return norm.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norm_rounds_like_llama(dtype: torch.dtype) -> None:
    norm = _norm(dtype)
    x = (torch.randn(3, 5, 200, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    with torch.inference_mode():
        expected, got = norm(x), FusedRMSNorm(norm)(x)
    assert got.dtype == dtype and got.shape == x.shape
    # only the order of the fp32 sum of squares differs: the variance's last bit, which two roundings carry into
    # a few fp32 ulps, and in bf16 into one ulp now and then
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-20
    torch.testing.assert_close(got, expected, rtol=ulp, atol=0)
    if dtype == torch.bfloat16:
        assert (got != expected).float().mean() < 0.01


@needs_kernels
def test_prompt_rows_split_across_threads_give_the_same_result(
    one_thread_and_several: Callable[..., tuple[torch.Tensor, torch.Tensor]],
) -> None:
    norm = FusedRMSNorm(_norm(torch.bfloat16))
    x = torch.randn(2, 150, 200, generator=torch.Generator().manual_seed(3)).bfloat16()  # 300 rows
    one, many = one_thread_and_several(lambda: norm(x))
    assert torch.equal(one, many)
    torch.testing.assert_close(many, _norm(torch.bfloat16)(x), rtol=2.0**-7, atol=0)


def test_fused_norm_falls_back_to_torch_where_the_op_does_not_apply() -> None:
    norm = _norm(torch.bfloat16)
    fused = FusedRMSNorm(norm)
    x32 = torch.randn(2, 200)  # float32 input, bf16 weight: torch promotes, so must we
    assert torch.equal(fused(x32), norm(x32))
    x16 = x32.bfloat16()
    dispatch.set_isa("torch")
    try:
        assert torch.equal(fused(x16), norm(x16))
    finally:
        dispatch.set_isa(None)


@needs_kernels
def test_fuse_norms_swaps_llama_norms_only(pruned_model: Callable[..., transformers.PreTrainedModel]) -> None:
    llama = pruned_model("llama")
    fused = copy.deepcopy(llama)
    layers = llama.config.num_hidden_layers
    assert fuse_norms_(fused) == 2 * layers + 1  # two per layer and the final one
    assert isinstance(fused.model.layers[0].input_layernorm, FusedRMSNorm)
    assert fused.state_dict().keys() == llama.state_dict().keys()
    prompt = torch.tensor([[5, 17, 250, 3, 99]])
    with torch.inference_mode():
        torch.testing.assert_close(fused(prompt).logits, llama(prompt).logits, rtol=0.02, atol=0.02)
    gpt2 = pruned_model("gpt2")  # LayerNorm, not RMSNorm
    assert fuse_norms_(gpt2) == 0
