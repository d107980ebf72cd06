"""The rotary embedding runs as one C++ op inside a converted model's attention, equal bit for bit to
transformers' own, and nowhere else."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.phi3 import modeling_phi3

from sparseft.runtime import dispatch, rotary
from sparseft.runtime.rotary import fast_rotary, fuse_rotary_

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


def _count_op_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dispatch.rotary

    def counted(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(dispatch, "rotary", counted)
    return calls


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


@needs_kernels
def test_inside_a_marked_call_what_the_op_does_not_cover_runs_transformers_ops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _count_op_calls(monkeypatch)
    apply = fast_rotary(modeling_llama.apply_rotary_pos_emb)
    q, k, cos, sin = _qkcs(torch.bfloat16)
    token = rotary._INSIDE.set(True)
    try:
        apply(q, k, cos, sin)
        assert len(calls) == 1
        apply(*_qkcs(torch.bfloat16, tokens=rotary._OP_TOKENS))
        assert len(calls) == 2
        prompt = _qkcs(
            torch.bfloat16, tokens=rotary._OP_TOKENS + 1
        )  # a longer prompt: the original is faster
        assert torch.equal(apply(*prompt)[0], modeling_llama.apply_rotary_pos_emb(*prompt)[0])
        assert len(calls) == 2
        for args in [(q.half(), k.half(), cos.half(), sin.half()), (q.float(), k, cos, sin)]:  # fp16; mixed
            assert torch.equal(apply(*args)[0], modeling_llama.apply_rotary_pos_emb(*args)[0])
        assert len(calls) == 2
        # Phi-3's partial rotary (Phi-4-mini's 0.75): cos and sin cover only the first features of each head
        partial = fast_rotary(modeling_phi3.apply_rotary_pos_emb)
        args = (q, k, cos[..., :12], sin[..., :12])
        assert torch.equal(partial(*args)[0], modeling_phi3.apply_rotary_pos_emb(*args)[0])
        assert len(calls) == 2
    finally:
        rotary._INSIDE.reset(token)


@needs_kernels
def test_outside_a_marked_call_transformers_ops_run(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_op_calls(monkeypatch)
    q, k, cos, sin = _qkcs(torch.bfloat16)
    got = fast_rotary(modeling_llama.apply_rotary_pos_emb)(q, k, cos, sin)
    assert calls == []
    assert torch.equal(got[0], modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)[0])


@needs_kernels
def test_fuse_rotary_takes_the_op_in_the_converted_model_only(
    monkeypatch: pytest.MonkeyPatch, pruned_model: Callable[..., transformers.PreTrainedModel]
) -> None:
    # restored when the test ends
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", modeling_llama.apply_rotary_pos_emb)
    model = pruned_model("llama")
    other = copy.deepcopy(model)
    prompt = torch.tensor([[5, 17, 250, 3, 99]])
    with torch.inference_mode():
        expected = model(prompt).logits
    layers = model.config.num_hidden_layers
    assert fuse_rotary_(model) == layers
    assert isinstance(model.model.layers[0].self_attn, modeling_llama.LlamaAttention)

    calls = _count_op_calls(monkeypatch)
    with torch.inference_mode():
        assert torch.equal(model(prompt).logits, expected)
        assert len(calls) == layers
        other(prompt)  # same architecture, not converted
    assert len(calls) == layers
    assert fuse_rotary_(model) == layers  # a second call changes nothing
    assert fuse_rotary_(pruned_model("gpt2")) == 0  # no rotary embedding there
    assert fuse_rotary_(pruned_model("gpt_neox")) == 0  # another function: partial rotary, its own layout
