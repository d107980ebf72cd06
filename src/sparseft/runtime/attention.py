"""Decoding attention (one new token over the whole KV cache) as one C++ op (kernels/attention.cpp).

torch's scaled_dot_product_attention costs 55-100 µs a call on this CPU for one query token over 16-144 cached
ones, mostly fixed overhead, once per layer and token; the op takes 10-26 µs. transformers picks a model's
attention function by name from a registry, so `fuse_attention_` registers this one under "sparseft" (with the
SDPA mask rules) and names it in the converted model's config: other models in the process keep their own. It
takes the calls it covers (CPU, bf16, one query token, no mask, head size a multiple of 32, no dropout, softcap
or sinks) and hands everything else, prefill included, to transformers' SDPA function unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparseft.runtime import dispatch

NAME = "sparseft"
_CHANGES_THE_MATH = ("softcap", "s_aux", "sinks")


def _covered(query: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float, kwargs: dict) -> bool:
    return (
        query.shape[2] == 1
        and attention_mask is None
        and dropout == 0.0
        and query.dtype == torch.bfloat16
        and query.shape[-1] % 32 == 0
        and query.shape[-1] <= 256
        and query.device.type == "cpu"
        and kwargs.get("position_bias") is None
        and not any(kwargs.get(name) is not None for name in _CHANGES_THE_MATH)
        and dispatch.current_isa() == "avx512"
    )


def decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: `query` (B, H, Q, D), `key`/`value` (B, Hkv, L, D); returns
    the output as (B, Q, H, D) and no weights."""
    if _covered(query, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        try:
            return dispatch.decode_attention(query, key, value, scale), None
        except RuntimeError:  # a shape or layout the op does not take: SDPA does
            pass
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def fuse_attention_(model: nn.Module) -> int:
    """Give `model`'s SDPA attention the op for decoding steps; returns how many configs now name it. Models set
    to another attention ("eager" for attention weights, flash kernels) are left as they are, and nothing changes
    where the AVX-512 kernels are not available."""
    if dispatch.best_isa() != "avx512":
        return 0
    AttentionInterface.register(NAME, decode_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    configs = {
        id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)
    }
    count = 0
    for config in configs.values():
        if config._attn_implementation == "sdpa":
            config._attn_implementation = NAME
            count += 1
    return count
