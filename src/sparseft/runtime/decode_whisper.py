"""The direct decoding step of a Whisper decoder layer (see decode_layer): LayerNorm, the stacked q/k/v, the cache
update and attention over the new token's cache, out_proj; LayerNorm, q_proj and attention over the encoder's
keys and values already in the cross-attention cache, out_proj; LayerNorm, fc1, GELU, fc2. The first step of a
transcription, which computes the encoder's keys and values, runs the layer's own forward."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, PretrainedConfig

from sparseft.runtime import attention, dispatch, step_guard
from sparseft.runtime.fuse import stacked_linear

# What WhisperDecoder passes a layer at a decoding step besides the hidden states.
_ARGUMENTS = attention.HARMLESS | {
    "attention_mask",
    "encoder_hidden_states",
    "encoder_attention_mask",
    "cache",
    "past_key_values",
}
_POSITIONAL = ("attention_mask", "encoder_hidden_states")


def _cpu_bf16(norm: Any) -> bool:
    return (
        type(norm) is nn.LayerNorm
        and norm.weight is not None
        and norm.bias is not None
        and norm.weight.dtype == norm.bias.dtype == torch.bfloat16
        and norm.weight.device.type == "cpu"
    )


def _covered(keys: Any, values: Any, batch: int, heads: int, head_dim: int) -> bool:
    """Whether attention over these cached keys and values is one the decoding attention op takes (what
    `attention._covered` checks of them)."""
    return (
        isinstance(keys, torch.Tensor)
        and isinstance(values, torch.Tensor)
        and keys.shape == values.shape
        and keys.dim() == 4
        and keys.shape[0] == batch
        and keys.shape[1] == heads
        and keys.shape[2] > 0
        and keys.shape[3] == head_dim
        and keys.dtype == values.dtype == torch.bfloat16
        and keys.device.type == values.device.type == "cpu"
        and keys.stride(3) == values.stride(3) == 1
    )


@dataclass(eq=False)
class WhisperStep:
    """What a decoding step reads from its layer, looked up once (plain references, as `LlamaStep`)."""

    config: PretrainedConfig
    norms: tuple[nn.LayerNorm, nn.LayerNorm, nn.LayerNorm]
    qkv: nn.Module
    width: int
    heads: int
    head_dim: int
    scaling: float
    self_out: nn.Module
    cross_q: nn.Module
    cross_out: nn.Module
    fc1: nn.Module
    fc2: nn.Module
    index: int
    places: step_guard.Places

    def _norm(self, which: int, h: torch.Tensor) -> torch.Tensor:
        norm = self.norms[which]
        return nn.functional.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def _query(self, y: torch.Tensor, batch: int) -> torch.Tensor:
        # scaled before the attention, which then scales by 1, as WhisperAttention does
        return (y * self.scaling).view(batch, 1, self.heads, self.head_dim).transpose(1, 2).contiguous()

    def step(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        """The layer's output for a decoding step this path covers, or None (the layer's own forward runs)."""
        if not 1 <= len(args) <= 3 or not kwargs.keys() <= _ARGUMENTS:
            return None
        named = {**kwargs, **dict(zip(_POSITIONAL, args[1:], strict=False))}
        h = args[0]
        cache = named.get("cache", named.get("past_key_values"))
        if (
            named.get("attention_mask") is not None
            or named.get("encoder_attention_mask") is not None
            or not isinstance(named.get("encoder_hidden_states"), torch.Tensor)
            or not isinstance(h, torch.Tensor)
            or not isinstance(cache, EncoderDecoderCache)
            or cache.is_updated.get(self.index) is not True  # the first step fills the cross-attention cache
        ):
            return None
        own = cache.self_attention_cache
        cross = cache.cross_attention_cache
        batch = h.shape[0]
        if (
            not isinstance(own, DynamicCache)
            or not step_guard.known_layer(own.layers, self.index)
            or not isinstance(cross, DynamicCache)
            or len(cross.layers) <= self.index
            or h.dim() != 3
            or h.shape[1:] != (1, self.width)
            or h.dtype != torch.bfloat16
            or h.device.type != "cpu"
            or not h.is_contiguous()
        ):
            return None
        cross_layer = cross.layers[self.index]
        cross_keys: Any = getattr(cross_layer, "keys", None)
        cross_values: Any = getattr(cross_layer, "values", None)
        if (
            not _covered(cross_keys, cross_values, batch, self.heads, self.head_dim)
            or self.config._attn_implementation != attention.NAME
            or step_guard.changed(self.places)
            or dispatch.current_isa() != "avx512"
        ):
            return None
        shape = (batch, 1, self.heads, self.head_dim)
        y = self.qkv(self._norm(0, h))
        width = self.width
        q = self._query(y[..., :width], batch)
        k = y[..., width : 2 * width].view(shape).transpose(1, 2).contiguous()
        v = y[..., 2 * width :].view(shape).transpose(1, 2).contiguous()
        step_guard.grow_(own.layers, self.index)
        k, v = own.update(k, v, self.index)
        a = dispatch.decode_attention(q, k, v, 1.0)
        h = h + self.self_out(a.reshape(batch, 1, width))
        q = self._query(self.cross_q(self._norm(1, h)), batch)
        a = dispatch.decode_attention(q, cross_keys, cross_values, 1.0)
        h = h + self.cross_out(a.reshape(batch, 1, width))
        return h + self.fc2(nn.functional.gelu(self.fc1(self._norm(2, h))))

    def agrees(self, layer: nn.Module, model: nn.Module) -> bool:
        """Three decoding steps on random input, through the layer's own forward and (after the first, which fills
        the cross-attention cache) the direct path, with a cache each: the same outputs, bit for bit."""
        cls = type(layer)
        name = "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
        caches = [EncoderDecoderCache(DynamicCache(), DynamicCache()) for _ in range(2)]
        g = torch.Generator().manual_seed(0)
        encoded = torch.randn(1, 6, self.width, generator=g).to(torch.bfloat16)
        with torch.inference_mode(), step_guard.evaluating(layer):
            for position in range(3):
                h = torch.randn(1, 1, self.width, generator=g).to(torch.bfloat16)
                args = (h, None, encoded)
                kwargs: dict[str, Any] = {"encoder_attention_mask": None, "use_cache": True}
                expected = cls.forward(layer, *args, **kwargs, **{name: caches[0]})
                if position == 0:
                    got = cls.forward(layer, *args, **kwargs, **{name: caches[1]})
                else:
                    got = self.step(args, {**kwargs, name: caches[1]})
                if not isinstance(expected, torch.Tensor) or got is None or not torch.equal(got, expected):
                    return False
        return True


def plan(layer: nn.Module) -> WhisperStep | None:
    """The direct step of `layer` if it is a converted Whisper decoder layer (its self-attention q/k/v fused, its
    attention taken by the op), else None."""
    own: Any = getattr(layer, "self_attn", None)
    cross: Any = getattr(layer, "encoder_attn", None)
    config = getattr(own, "config", None)
    names = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
    norms = tuple(getattr(layer, n, None) for n in names)
    if (
        not isinstance(config, PretrainedConfig)
        or config.model_type != "whisper"
        or config._attn_implementation != attention.NAME
        or config.activation_function != "gelu"
        or cross is None
        or not all(_cpu_bf16(n) for n in norms)
    ):
        return None
    parts: list[Any] = [getattr(own, n, None) for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    parts += [getattr(cross, n, None) for n in ("q_proj", "out_proj")]
    parts += [getattr(layer, n, None) for n in ("fc1", "fc2")]
    if not all(isinstance(m, nn.Module) for m in parts):
        return None
    q, k, v, self_out, cross_q, cross_out, fc1, fc2 = parts
    qkv = stacked_linear([q, k, v])
    names_of_sizes = ("num_heads", "head_dim", "scaling", "layer_idx")
    heads, head_dim, scaling, index = (getattr(own, n, None) for n in names_of_sizes)
    if (
        qkv is None
        or not isinstance(heads, int)
        or not isinstance(head_dim, int)
        or head_dim % 32
        or head_dim > 256
        or not isinstance(scaling, float)
        or not isinstance(index, int)
        or tuple(getattr(cross, n, None) for n in names_of_sizes) != (heads, head_dim, scaling, index)
    ):
        return None
    return WhisperStep(
        config=config,
        norms=norms,  # type: ignore[arg-type]
        qkv=qkv,
        width=heads * head_dim,
        heads=heads,
        head_dim=head_dim,
        scaling=scaling,
        self_out=self_out,
        cross_q=cross_q,
        cross_out=cross_out,
        fc1=fc1,
        fc2=fc2,
        index=index,
        places=step_guard.places(
            (layer, ("self_attn", "encoder_attn", "activation_fn", "fc1", "fc2", *names)),
            (own, ("q_proj", "k_proj", "v_proj", "out_proj")),
            (cross, ("q_proj", "k_proj", "v_proj", "out_proj")),
            (q.stacked, ("linear",)),
        ),
    )
