"""The rotary embedding op (kernels/rotary.cpp) equals transformers' own apply_rotary_pos_emb bit for bit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from sparseft.runtime import dispatch

needs_kernels = pytest.mark.skipif(
    dispatch.best_isa() == "torch", reason="the C++ kernels are not built here"
)


def _qkcs(dtype: torch.dtype, batch: int = 2, tokens: int = 5) -> tuple[torch.Tensor, ...]:
    # laid out as the attention makes them: (B, T, H * D) viewed as (B, T, H, D), then transposed
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, tokens, 6 * 16, generator=g).to(dtype).view(batch, tokens, 6, 16).transpose(1, 2)
    k = torch.randn(batch, tokens, 2 * 16, generator=g).to(dtype).view(batch, tokens, 2, 16).transpose(1, 2)
    cos, sin = (torch.randn(batch, tokens, 16, generator=g).to(dtype) for _ in range(2))
    return q, k, cos, sin


@needs_kernels
@pytest.mark.parametrize("modeling", [modeling_llama, modeling_phi3], ids=["llama", "phi3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_op_equals_transformers_bit_for_bit(modeling: object, dtype: torch.dtype) -> None:
    q, k, cos, sin = _qkcs(dtype)
    expected = modeling.apply_rotary_pos_emb(q, k, cos, sin)  # type: ignore[attr-defined]
    got = dispatch.rotary(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@needs_kernels
def test_op_gives_the_same_bits_on_one_thread_or_several(
    one_thread_and_several: Callable[..., tuple[Any, Any]],
) -> None:
    q, k, cos, sin = _qkcs(torch.bfloat16, tokens=512)  # (batch, head) pairs split across threads
    one, many = one_thread_and_several(lambda: dispatch.rotary(q, k, cos, sin))
    expected = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, b) and torch.equal(b, c) for a, b, c in zip(one, many, expected, strict=True))


@needs_kernels
def test_op_refuses_what_it_does_not_cover() -> None:
    q, k, cos, sin = _qkcs(torch.bfloat16)
    with pytest.raises(RuntimeError, match="one dtype"):
        dispatch.rotary(q.float(), k, cos, sin)
    with pytest.raises(RuntimeError, match="shapes"):
        dispatch.rotary(q, k, cos[:, :3], sin[:, :3])
