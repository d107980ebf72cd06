"""The direct decoding step of a Llama, Mistral, Qwen2/3 or Phi-3 decoder layer (see decode_layer): RMSNorm, the
stacked q/k/v, Qwen3's per-head norms, rotary embedding, the cache update, attention, o_proj, the stacked gate/up,
SiLU times up, down_proj, as op calls. Phi-3 keeps q/k/v and gate/up stacked in its own weights."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from sparseft.runtime import attention, dispatch, rotary, step_guard
from sparseft.runtime.fuse import stacked_linear
from sparseft.runtime.norm import FusedRMSNorm

ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# What those models pass a decoder layer at a decoding step besides the hidden states.
_ARGUMENTS = attention.HARMLESS | {"attention_mask", "position_embeddings", "cache", "past_key_values"}


def _cpu_bf16(norm: Any) -> bool:
    return (
        isinstance(norm, FusedRMSNorm)
        and norm.weight.dtype == torch.bfloat16
        and norm.weight.device.type == "cpu"
    )


@dataclass(eq=False)
class LlamaStep:
    """What a decoding step reads from its layer, looked up once. Plain references: `copy.deepcopy` of the model
    maps them onto the copy's own modules."""

    config: PretrainedConfig
    qkv: nn.Module
    q_rows: int
    kv_rows: int
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    o_proj: nn.Module
    gate_up: nn.Module
    inner: int
    down: nn.Module
    norms: tuple[FusedRMSNorm, FusedRMSNorm]
    head_norms: tuple[FusedRMSNorm, FusedRMSNorm] | None  # Qwen3's per-head norms of q and k
    index: int
    places: step_guard.Places

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The layer's output for a decoding step this path covers, or None (the layer's own forward runs)."""
        if len(args) != 1 or not kwargs.keys() <= _ARGUMENTS or kwargs.get("attention_mask") is not None:
            return None
        h = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        embeddings = kwargs.get("position_embeddings")
        layers = getattr(cache, "layers", None)
        if (
            not isinstance(h, torch.Tensor)
            or not isinstance(embeddings, tuple)
            or not isinstance(cache, DynamicCache)
            or not step_guard.known_layer(layers, self.index)
        ):
            return None
        cos, sin = embeddings
        batch = h.shape[0]
        if (
            h.dim() != 3
            or h.shape[1] != 1
            or h.dtype != torch.bfloat16
            or h.device.type != "cpu"
            or not h.is_contiguous()
            or cos.shape != (batch, 1, self.head_dim)
            or sin.shape != cos.shape
            or cos.dtype != torch.bfloat16
            or sin.dtype != torch.bfloat16
            or cos.stride(-1) != 1
            or sin.stride(-1) != 1
            or self.config._attn_implementation != attention.NAME
            or step_guard.changed(self.places)
            or dispatch.current_isa() != "avx512"
        ):
            return None
        first, second = self.norms
        x = dispatch.rms_norm(h, first.weight, first.variance_epsilon)
        y = self.qkv(x)
        q_end, k_end = self.q_rows, self.q_rows + self.kv_rows
        q = y[..., :q_end].view(batch, 1, self.heads, self.head_dim)
        k = y[..., q_end:k_end].view(batch, 1, self.kv_heads, self.head_dim)
        v = y[..., k_end:].view(batch, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.head_norms is not None:
            q_norm, k_norm = self.head_norms
            q = dispatch.rms_norm(q, q_norm.weight, q_norm.variance_epsilon)
            k = dispatch.rms_norm(k, k_norm.weight, k_norm.variance_epsilon)
        q, k = dispatch.rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        step_guard.grow_(layers, self.index)
        k, v = cache.update(k, v, self.index)
        a = dispatch.decode_attention(q, k, v, self.scale).reshape(batch, 1, self.heads * self.head_dim)
        h = h + self.o_proj(a)
        x = dispatch.rms_norm(h, second.weight, second.variance_epsilon)
        g = self.gate_up(x)
        return h + self.down(nn.functional.silu(g[..., : self.inner]) * g[..., self.inner :])

    def agrees(self, layer: nn.Module, model: nn.Module) -> bool:
        """Two decoding steps on random input, through the layer's own forward and the direct path, with a cache
        each: the same outputs, bit for bit."""
        rotary_embedding = next(
            (m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None
        )
        if rotary_embedding is None:
            return False
        cls = type(layer)
        name = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
        caches = (DynamicCache(config=self.config), DynamicCache(config=self.config))
        g = torch.Generator().manual_seed(0)
        with torch.inference_mode(), step_guard.evaluating(layer):
            for position in range(2):
                h = torch.randn(1, 1, self.config.hidden_size, generator=g).to(torch.bfloat16)
                ids = torch.tensor([[position]])
                kwargs: dict[str, Any] = {
                    "attention_mask": None,
                    "position_ids": ids,
                    "use_cache": True,
                    "position_embeddings": rotary_embedding(h, ids),
                }
                expected = cls.forward(layer, h, **kwargs, **{name: caches[0]})
                got = self.step((h,), {**kwargs, name: caches[1]})
                if not isinstance(expected, torch.Tensor) or got is None or not torch.equal(got, expected):
                    return False
        return True


def plan(layer: nn.Module) -> LlamaStep | None:
    """The direct step of `layer` if it is a converted layer of one of `ARCHITECTURES` (its q/k/v and gate/up
    fused, or stacked in Phi-3's own weights; its norms, rotary embedding and attention taken by the ops), else
    None."""
    attn: Any = getattr(layer, "self_attn", None)
    mlp: Any = getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    config = getattr(attn, "config", None)
    if not isinstance(config, PretrainedConfig) or mlp is None:
        return None
    if (
        config.model_type not in ARCHITECTURES
        or config._attn_implementation != attention.NAME
        or getattr(config, "hidden_act", None) != "silu"
        or not rotary.takes_op(attn)
        or not all(_cpu_bf16(n) for n in norms)
    ):
        return None
    head_dim, scale, index = (getattr(attn, n, None) for n in ("head_dim", "scaling", "layer_idx"))
    if not isinstance(head_dim, int) or not isinstance(scale, float) or not isinstance(index, int):
        return None
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    o: Any = getattr(attn, "o_proj", None)
    down: Any = getattr(mlp, "down_proj", None)
    qkv: Any = getattr(attn, "qkv_proj", None)
    gate_up: Any = getattr(mlp, "gate_up_proj", None)
    stacks: tuple[tuple[nn.Module, tuple[str, ...]], ...]
    if qkv is not None:  # Phi-3
        inner = getattr(config, "intermediate_size", None)
        stacks = (
            (attn, ("qkv_proj", "o_proj", "q_norm", "k_norm")),
            (mlp, ("gate_up_proj", "down_proj", "activation_fn")),
        )
    else:
        members: list[Any] = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        gate: Any = getattr(mlp, "gate_proj", None)
        up: Any = getattr(mlp, "up_proj", None)
        qkv, gate_up = stacked_linear(members), stacked_linear([gate, up])
        if (
            qkv is None
            or gate_up is None
            or members[0].out_features != heads * head_dim
            or members[1].out_features != members[2].out_features
        ):
            return None
        inner = gate.out_features
        stacks = (
            (attn, ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
            (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn")),
            (members[0].stacked, ("linear",)),
            (gate.stacked, ("linear",)),
        )
    head_norms = (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
    if head_norms != (None, None) and not all(_cpu_bf16(n) for n in head_norms):
        return None
    if (
        not all(isinstance(m, nn.Module) for m in (qkv, gate_up, o, down))
        or not isinstance(inner, int)
        or head_dim % 32
        or head_dim > 256
        # a module wrapped before conversion may not say its size: it keeps the layer's own forward
        or getattr(qkv, "out_features", None) != (heads + 2 * kv_heads) * head_dim
        or getattr(gate_up, "out_features", None) != 2 * inner
    ):
        return None
    return LlamaStep(
        config=config,
        qkv=qkv,
        q_rows=heads * head_dim,
        kv_rows=kv_heads * head_dim,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=scale,
        o_proj=o,
        gate_up=gate_up,
        inner=inner,
        down=down,
        norms=norms,  # type: ignore[arg-type]
        head_norms=None if head_norms == (None, None) else head_norms,  # type: ignore[arg-type]
        index=index,
        places=step_guard.places(
            (layer, ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")),
            (layer, ("resid_attn_dropout", "resid_mlp_dropout")),
            *stacks,
        ),
    )
