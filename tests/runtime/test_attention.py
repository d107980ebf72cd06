"""Decoding attention runs as one C++ op (AVX2 or AVX-512) in the own decoders and in converted models: as exact as
SDPA against a float64 reference, and everything it does not cover goes to SDPA."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sparseft.runtime import dispatch
from sparseft.runtime.attention import NAME, decode_attention, fuse_attention_
from sparseft.runtime.models import ops

needs_avx512 = pytest.mark.skipif(
    dispatch.best_isa() != "avx512", reason="the op needs the AVX-512 (BF16) kernels"
)
# The op's code paths this machine runs (AVX2 everywhere the AVX-512 one runs).
OP_ISAS = [isa for isa in ("avx2", "avx512") if isa in dispatch.available_isas()]


@pytest.fixture(params=OP_ISAS)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each of the op's code paths in turn, chosen as a user would (SPARSEFT_ISA)."""
    monkeypatch.setenv("SPARSEFT_ISA", request.param)
    return str(request.param)


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from their module."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(
    batch: int, heads: int, kv_heads: int, dim: int, keys: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(keys * 7 + dim)
    q = torch.randn(batch, heads, 1, dim, generator=g).to(dtype)
    # the cache holds more rows than are used, so k and v are not contiguous, as a slice of a static cache is not
    k = torch.randn(batch, kv_heads, keys + 3, dim, generator=g).to(dtype)[:, :, :keys]
    v = torch.randn(batch, kv_heads, keys + 3, dim, generator=g).to(dtype)[:, :, :keys]
    return q, k, v


def _exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    groups = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(groups, dim=1)
    v64 = v.double().repeat_interleave(groups, dim=1)
    p = torch.softmax(q.double() @ k64.transpose(-1, -2) * scale, dim=-1)
    return (p @ v64).transpose(1, 2)


def _count_op_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = dispatch.decode_attention

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(dispatch, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("batch,heads,kv_heads", [(1, 4, 4), (2, 8, 2), (1, 6, 3), (1, 14, 2), (3, 32, 4)])
@pytest.mark.parametrize("dim", [32, 64, 128, 256])
@pytest.mark.parametrize("keys", [1, 7, 9, 15, 16, 17, 32, 100])
def test_op_matches_float64_attention(
    isa: str, batch: int, heads: int, kv_heads: int, dim: int, keys: int
) -> None:
    q, k, v = _qkv(batch, heads, kv_heads, dim, keys)
    scale = dim**-0.5
    got = dispatch.decode_attention(q, k, v, scale)
    assert got.shape == (batch, 1, heads, dim) and got.dtype == torch.bfloat16 and got.is_contiguous()
    exact = _exact(q, k, v, scale)
    # one rounding to bf16 (half an ulp: 2^-9 relative) plus fp32 sums
    torch.testing.assert_close(got.double(), exact, rtol=2**-8, atol=1e-4)
    # and no further from the exact result than SDPA, or than half an ulp of the largest output
    sdpa, _ = sdpa_attention_forward(_Attention(heads // kv_heads), q, k, v, None, scaling=scale)
    error, sdpa_error = ((t.double() - exact).abs().max().item() for t in (got, sdpa))
    assert error <= max(sdpa_error, 2**-9 * exact.abs().max().item())


def test_op_reads_any_layout(isa: str) -> None:
    g = torch.Generator().manual_seed(1)
    # q as the attention makes it, (B, 1, H, D) transposed; k and v with tokens outermost, (B, L, Hkv, D) transposed
    q = torch.randn(2, 1, 8, 64, generator=g).bfloat16().transpose(1, 2)
    k = torch.randn(2, 23, 2, 64, generator=g).bfloat16().transpose(1, 2)
    v = torch.randn(2, 23, 2, 64, generator=g).bfloat16().transpose(1, 2)
    got = dispatch.decode_attention(q, k, v, 0.125)
    assert torch.equal(got, dispatch.decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), 0.125))
    torch.testing.assert_close(got.double(), _exact(q, k, v, 0.125), rtol=2**-8, atol=1e-4)


def test_nan_in_the_cache_gives_nan_as_sdpa_does(isa: str) -> None:
    q, k, v = _qkv(1, 4, 2, 64, 20)
    k = k.clone()
    k[0, 0, 5, 3] = float("nan")
    got = dispatch.decode_attention(q, k, v, 0.125)
    sdpa, _ = sdpa_attention_forward(_Attention(2), q, k, v, None, scaling=0.125)
    assert torch.equal(got.isnan(), sdpa.isnan()) and got[0, 0, :2].isnan().all()


def test_large_scores_do_not_overflow(isa: str) -> None:
    q, k, v = _qkv(1, 4, 2, 64, 40)
    q = q * 60  # scores in the thousands: exp must be taken after subtracting the maximum
    got = dispatch.decode_attention(q, k, v, 0.125)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), _exact(q, k, v, 0.125), rtol=2**-8, atol=1e-3)


@needs_avx512
@pytest.mark.parametrize(
    "change",
    ["float32", "head size 16", "two query tokens", "portable kernels", "an argument it does not know"],
)
def test_what_the_op_does_not_cover_goes_to_sdpa(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    dtype = torch.float32 if change == "float32" else torch.bfloat16
    q, k, v = _qkv(1, 4, 2, 16 if change == "head size 16" else 64, 9, dtype)
    if change == "two query tokens":
        q = torch.cat([q, q], dim=2)
    if change == "portable kernels":
        monkeypatch.setenv("SPARSEFT_ISA", "avx2")
    extra = {"indices": torch.arange(3)} if change == "an argument it does not know" else {}
    module = _Attention(2)
    calls = _count_op_calls(monkeypatch)
    got, _ = decode_attention(module, q, k, v, None, scaling=0.125, **extra)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.125, **extra)
    assert torch.equal(got, expected)
    assert calls == []


def test_the_op_refuses_what_it_does_not_cover(isa: str) -> None:
    q, k, v = _qkv(1, 4, 2, 16, 9)
    with pytest.raises(RuntimeError, match="head sizes"):
        dispatch.decode_attention(q, k, v, 0.25)
    q, k, v = _qkv(1, 4, 2, 64, 9, torch.float32)
    with pytest.raises(RuntimeError, match="bfloat16"):
        dispatch.decode_attention(q, k, v, 0.125)
    q, k, v = _qkv(1, 6, 4, 64, 9)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        dispatch.decode_attention(q, k, v, 0.125)


def test_the_portable_kernels_do_not_take_the_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEFT_ISA", "scalar")
    q, k, v = _qkv(1, 4, 2, 64, 9)
    assert not ops.op_attends(q)
    with pytest.raises(RuntimeError, match="needs the AVX2 or AVX-512 kernels"):
        dispatch.decode_attention(q, k, v, 0.125)


def test_op_reads_a_window_of_a_static_cache(isa: str, one_thread_and_several: Callable[..., Any]) -> None:
    # as KVCache.attend passes them: the rows [first, end) of (B, Hkv, capacity, D) buffers, no copy
    g = torch.Generator().manual_seed(3)
    cache_k = torch.randn(2, 4, 64, 64, generator=g).bfloat16()
    cache_v = torch.randn(2, 4, 64, 64, generator=g).bfloat16()
    q = torch.randn(2, 32, 1, 64, generator=g).bfloat16()
    k, v = cache_k[:, :, 5:46], cache_v[:, :, 5:46]
    assert not k.is_contiguous()
    one, several = one_thread_and_several(lambda: dispatch.decode_attention(q, k, v, 0.125))
    assert torch.equal(one, several)  # each group of heads is computed alike on any thread
    assert torch.equal(one, dispatch.decode_attention(q, k.contiguous(), v.contiguous(), 0.125))
    torch.testing.assert_close(one.double(), _exact(q, k, v, 0.125), rtol=2**-8, atol=1e-4)


def test_the_own_decoders_step_takes_the_op_and_agrees_with_sdpa(
    isa: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    q, k, v = _qkv(2, 8, 2, 64, 37)
    calls = _count_op_calls(monkeypatch)
    assert ops.op_attends(q)
    got = ops.decode_attention(q, k, v, 0.125)
    assert len(calls) == 1
    sdpa = ops.attention(q, k, v, 0.125)
    exact = _exact(q, k, v, 0.125)
    assert (got.double() - exact).abs().max() <= max(
        (sdpa.double() - exact).abs().max().item(), 2**-9 * exact.abs().max().item()
    )


@needs_avx512
def test_a_mask_goes_to_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(1, 4, 2, 64, 9)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    mask[..., :3] = False  # left padding
    calls = _count_op_calls(monkeypatch)
    got, _ = decode_attention(_Attention(2), q, k, v, mask, scaling=0.125)
    assert calls == []
    assert torch.equal(got, sdpa_attention_forward(_Attention(2), q, k, v, mask, scaling=0.125)[0])


@needs_avx512
def test_fuse_attention_takes_the_op_for_decoding_in_the_converted_model_only(
    monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., transformers.PreTrainedModel]
) -> None:
    dense = decoder_model()
    model = copy.deepcopy(dense)
    assert fuse_attention_(model) == 1
    assert model.config._attn_implementation == NAME and dense.config._attn_implementation == "sdpa"
    assert fuse_attention_(decoder_model(attn="eager")) == 0  # chosen on purpose (attention weights): kept
    falcon = transformers.FalconForCausalLM(
        transformers.FalconConfig(hidden_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=300)
    )
    assert (
        fuse_attention_(falcon) == 0 and falcon.config._attn_implementation == "sdpa"
    )  # it branches on the name "sdpa"

    calls = _count_op_calls(monkeypatch)
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    steps = 6
    caches = {id(m): transformers.DynamicCache(config=m.config) for m in (model, dense)}
    with torch.inference_mode():
        for m in (model, dense):
            m(prompt, past_key_values=caches[id(m)], use_cache=True)
        assert calls == []  # the prompt (7 query tokens) goes to SDPA
        for step in range(steps):
            token = torch.tensor([[11 + step]])
            got = model(token, past_key_values=caches[id(model)], use_cache=True).logits.float()
            expected = dense(token, past_key_values=caches[id(dense)], use_cache=True).logits.float()
            assert ((got - expected).norm() / expected.norm()).item() < 0.02
    assert len(calls) == steps * model.config.num_hidden_layers


@needs_avx512
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_converted_model_generates_like_dense(
    arch: str, decoder_model: Callable[..., transformers.PreTrainedModel]
) -> None:
    dense = decoder_model(arch)
    model = copy.deepcopy(dense)
    fuse_attention_(model)
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    with torch.inference_mode():
        got = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        expected = dense.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got.tolist() == expected.tolist()


@needs_avx512
def test_whisper_decoder_takes_the_op_and_transcribes_like_dense(
    monkeypatch: pytest.MonkeyPatch, whisper_model: Callable[..., Any]
) -> None:
    dense = whisper_model()
    model = copy.deepcopy(dense)
    assert fuse_attention_(model) == 1
    features = torch.randn(1, 16, 100, generator=torch.Generator().manual_seed(0)).bfloat16()
    calls = _count_op_calls(monkeypatch)
    with torch.inference_mode():
        got = model.generate(features, max_new_tokens=8, do_sample=False)
        assert len(calls) > 0  # the decoder's self- and cross-attention at each new token
        expected = dense.generate(features, max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()


@needs_avx512
@pytest.mark.parametrize("family", ["gemma", "gpt2", "gpt_neox", "opt"])
def test_other_families_take_the_op_when_decoding(
    family: str, monkeypatch: pytest.MonkeyPatch, family_model: Callable[[str], Any]
) -> None:
    dense = family_model(family)
    model = copy.deepcopy(dense)
    assert fuse_attention_(model) == 1
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    options: dict[str, Any] = dict(
        max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
        return_dict_in_generate=True,
    )  # fmt: skip
    with torch.inference_mode():
        expected = dense.generate(prompt, **options)
        calls = _count_op_calls(monkeypatch)
        got = model.generate(prompt, **options)
    assert len(calls) == 5 * model.config.num_hidden_layers  # every step after the prompt
    assert got.sequences.tolist() == expected.sequences.tolist()
    for a, b in zip(got.logits, expected.logits, strict=True):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 0.02


def test_store_and_attend_writes_the_step_then_attends_over_the_window(isa: str) -> None:
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(2, 2, 48, 64, generator=g).bfloat16()
    cache_v = torch.randn(2, 2, 48, 64, generator=g).bfloat16()
    q = torch.randn(2, 8, 1, 64, generator=g).bfloat16()
    k = torch.randn(2, 2, 1, 64, generator=g).bfloat16()
    v = torch.randn(2, 2, 1, 64, generator=g).bfloat16()
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    expected_k[:, :, 30:31], expected_v[:, :, 30:31] = k, v
    got = ops.store_and_attend(q, k, v, cache_k, cache_v, 30, 4, 0.125)
    assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)  # row 30 and nothing else
    want = dispatch.decode_attention(q, expected_k[:, :, 4:31], expected_v[:, :, 4:31], 0.125)
    assert got.shape == (2, 1, 8, 64) and torch.equal(got, want)


@pytest.mark.parametrize(
    "change,message",
    [
        ("position", "not in a cache"),
        ("first", "not in a cache"),
        ("dtype", "bfloat16"),
        ("heads", "multiple"),
    ],
)
def test_store_and_attend_checks_everything_before_writing(isa: str, change: str, message: str) -> None:
    cache_k, cache_v = torch.zeros(1, 2, 16, 64).bfloat16(), torch.zeros(1, 2, 16, 64).bfloat16()
    q, k, v = torch.ones(1, 4, 1, 64).bfloat16(), torch.ones(1, 2, 1, 64).bfloat16(), torch.ones(1, 2, 1, 64)
    v = v.bfloat16()
    position, first = 5, 0
    if change == "position":
        position = 16
    elif change == "first":
        first = 6
    elif change == "dtype":
        v = v.float()
    else:
        q = torch.ones(1, 3, 1, 64).bfloat16()
    with pytest.raises(RuntimeError, match=message):
        dispatch.store_and_attend(q, k, v, cache_k, cache_v, position, first, 0.125)
    assert not cache_k.any() and not cache_v.any()
