"""The per-token operations of the runtime's own decoders: the C++ op where it covers the call (kernels/norm.cpp,
rotary.cpp, attention.cpp, activation.cpp), plain torch otherwise (float32 models, other CPUs, prompts). The torch forms follow
the transformers modeling code the tests compare against, operation for operation, so that float32 results agree
to rounding and bf16 ones to the last bit where the op does."""

from __future__ import annotations

import torch
from torch.nn import functional

from sparseft.runtime import dispatch

# Above this many tokens the rotary op is slower than torch's vectorized, threaded ops (both give the same bits).
ROTARY_OP_TOKENS = 32
# torch's elementwise ops split inputs of this many values or more across threads (at::internal::GRAIN_SIZE); a
# part that starts or ends inside a row computes its odd values with std::exp rather than its vector exp.
TORCH_GRAIN = 32768
# torch's vectorized loops take 64 values at a time at most (bf16 with AVX-512), and the rest of a row with
# std::exp: rows of a multiple of this many values are computed with the vector exp throughout.
TORCH_VECTOR_STEP = 64


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, cast back to the input's dtype, times the weight."""
    if (
        x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float32)
        and dispatch.current_isa() != "torch"
    ):
        return dispatch.rms_norm(x, weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k (B, H, T, D) rotated by cos, sin (B, T, R), any of them views (the op reads strides); with R < D only
    the first R features of each head turn (Phi-3's partial rotary) and the rest pass unchanged."""
    rotated = cos.shape[-1]
    if (
        rotated == q.shape[-1]
        and q.shape[2] <= ROTARY_OP_TOKENS
        and q.dtype == k.dtype == cos.dtype
        and q.dtype in (torch.bfloat16, torch.float32)
        and q.stride(-1) == k.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
        and dispatch.current_isa() != "torch"
    ):
        return dispatch.rotary(q, k, cos, sin)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    if rotated == q.shape[-1]:
        return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s
    q_turn, q_pass = q[..., :rotated], q[..., rotated:]
    k_turn, k_pass = k[..., :rotated], k[..., rotated:]
    return (
        torch.cat((q_turn * c + _rotate_half(q_turn) * s, q_pass), dim=-1),
        torch.cat((k_turn * c + _rotate_half(k_turn) * s, k_pass), dim=-1),
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a gated MLP, from the packed gate/up output (..., 2 * inner): the gate's half first."""
    inner = gate_up.shape[-1] // 2
    if (
        gate_up.dtype in (torch.bfloat16, torch.float32)
        and inner % TORCH_VECTOR_STEP == 0
        and gate_up.numel() // 2 < TORCH_GRAIN
        and dispatch.current_isa() in ("avx2", "avx512")
    ):
        # the op's exp is torch's vector exp (kernels/vec_avx2.h): where torch takes it for every value, as
        # here, the op gives torch's bits
        return dispatch.silu_mul(gate_up)
    return functional.silu(gate_up[..., :inner]) * gate_up[..., inner:]


def op_attends(q: torch.Tensor) -> bool:
    """Whether the decoding attention op takes a one-token query like `q` (B, H, 1, D)."""
    d = q.shape[-1]
    return (
        q.shape[2] == 1
        and q.dtype == torch.bfloat16
        and d % 32 == 0
        and d <= 256
        and q.device.type == "cpu"
        and dispatch.current_isa() in ("avx2", "avx512")
    )


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row over all of `k`, `v` (B, Hkv, L, D) in one op call: (B, 1, H, D)."""
    return dispatch.decode_attention(q, k, v, scale)


def store_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: int,
    first: int,
    scale: float,
) -> torch.Tensor:
    """A decoding step over a static cache: k, v (B, Hkv, 1, D) written to row `position` of the caches (B, Hkv,
    capacity, D), then q (B, H, 1, D) over their rows [first, position], (B, 1, H, D), in one op call where the
    decoding attention op takes q (`op_attends`)."""
    return dispatch.store_and_attend(q, k, v, key_cache, value_cache, position, first, scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """torch's SDPA of q (B, H, T, D) over k, v (B, Hkv, L, D), the keys shared by groups of heads; `mask` (B, 1,
    T, L) True where a query sees a key; without one, every key (`causal`: each query the keys up to its own, for
    T == L). Returns (B, T, H, D)."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        group = heads // kv_heads
        b, _, length, d = k.shape
        k = k[:, :, None].expand(b, kv_heads, group, length, d).reshape(b, heads, length, d)
        v = v[:, :, None].expand(b, kv_heads, group, length, d).reshape(b, heads, length, d)
    out = functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and mask is None and q.shape[2] > 1, scale=scale
    )
    return out.transpose(1, 2)
