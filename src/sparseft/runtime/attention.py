"""Decoding attention (one new token over the whole KV cache) as one C++ op (kernels/attention.cpp).

torch's scaled_dot_product_attention costs 55-100 µs a call on this CPU for one query token over 16-144 cached
ones, mostly fixed overhead, once per layer and token; the op takes 10-26 µs. transformers picks a model's
attention function by name from a registry, so `fuse_attention_` registers this one under "sparseft" (with the
SDPA mask rules) and names it in the converted model's config: other models in the process keep their own.

Only architectures checked to behave the same under another name than "sdpa" are converted: some transformers
models branch on that exact name (Falcon takes its eager path, DeepSeek-V3.2's indexer passes its top-k as an
argument SDPA never reads). For each architecture of `ARCHITECTURES`, greedy generation with SDPA registered under
another name gave the same scores bit for bit, with and without a padded batch (sliding windows included;
transformers 5.24). The op takes the calls it covers (CPU, bf16, one query token, no mask, a head size that is a
multiple of 32, nothing among the arguments that it does not know to be harmless: Gemma-2-style logit soft-capping
goes to SDPA, say) and hands everything else, prefill and encoders included, to transformers' SDPA function
unchanged. Whisper's decoder gains most: its cross-attention reads 1500 encoder positions per layer and token
(whisper-small's shape: 243 µs a call with SDPA, 152 µs with the op).
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
ARCHITECTURES = frozenset(
    {
        "llama", "mistral", "qwen2", "qwen3", "phi3", "whisper", "gemma", "gemma3_text", "gpt2", "opt", "gpt_neox",
        "gptj", "phi", "stablelm", "olmo", "olmo2", "smollm3", "granite", "cohere", "starcoder2", "helium",
        "seed_oss", "ernie4_5",
    }
)  # fmt: skip
# What those models pass besides q, k, v, the mask, dropout and scaling, none of which changes the result. A
# sliding window is already in the mask (SDPA's mask rules leave it out only where the window covers every key);
# attention weights are not returned under SDPA either. Any other argument goes to SDPA.
HARMLESS = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache_position",
        "sliding_window",
        "is_causal",
        "output_attentions",
        "output_hidden_states",
    }
)


def _covered(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> bool:
    return (
        attention_mask is None
        and dropout == 0.0
        and kwargs.keys() <= HARMLESS
        and query.dim() == 4
        and query.shape[2] == 1
        and key.shape == value.shape
        and key.dim() == 4
        and key.shape[0] == query.shape[0]
        and key.shape[3] == query.shape[3]
        and key.shape[1] > 0
        and query.shape[1] % key.shape[1] == 0
        and query.shape[3] % 32 == 0
        and query.shape[3] <= 256
        and query.dtype == key.dtype == value.dtype == torch.bfloat16
        and query.device.type == key.device.type == value.device.type == "cpu"
        and query.stride(3) == key.stride(3) == value.stride(3) == 1
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
    if _covered(query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return dispatch.decode_attention(query, key, value, scale), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def fuse_attention_(model: nn.Module) -> int:
    """Give the SDPA attention of `model` (one of `ARCHITECTURES`) the op for decoding steps; returns how many
    configs now name it. Models set to another attention ("eager" for attention weights, flash kernels) and other
    architectures are left as they are, and nothing changes where the AVX-512 kernels are not available."""
    if dispatch.best_isa() != "avx512":
        return 0
    configs = {
        id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)
    }
    chosen = [
        c
        for c in configs.values()
        if getattr(c, "model_type", None) in ARCHITECTURES
        and c._attn_implementation == "sdpa"
        and not c.sub_configs
    ]
    if chosen:
        AttentionInterface.register(NAME, decode_attention)
        AttentionMaskInterface.register(NAME, sdpa_mask)
    for config in chosen:
        config._attn_implementation = NAME
    return len(chosen)
