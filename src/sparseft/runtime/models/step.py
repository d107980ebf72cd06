"""The decoding step in one C++ call (kernels/decode_step.cpp): a token through every layer without returning to
Python between ops, for the Llama family and for Whisper's decoder. It runs the ops of the Python code
(`LlamaDecoder._block`, `WhisperModel.forward`) in the same order, so it gives the same bits; `takes` and
`whisper_takes` say where it applies, and everything else keeps the Python code."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from sparseft.runtime import dispatch
from sparseft.runtime.models.ops import TORCH_GRAIN, TORCH_VECTOR_STEP

# `model` below is a `LlamaDecoder` (models/llama.py) or a `WhisperModel` (models/whisper.py); both import this
# module.


def ready(
    model: Any, batch: int, build: Callable[[Any], Any | None], takes: Callable[[Any, int], bool]
) -> bool:
    """Whether a decoding step of `batch` rows goes through the model's layers in one C++ call now: the model
    allows it (`one_call_steps`), its stack, built by `build` on first use (`model._stack`; False: not this
    model), exists, and `takes` agrees."""
    if not model.one_call_steps:
        return False
    if model._stack is None:
        model._stack = build(model) or False
    return model._stack is not False and takes(model, batch)


def build(model: Any) -> Any | None:
    """The model's layers as a C++ `LayerStack`, or None where the step does not apply to this model whatever
    the input (dtype, head size, partial rotary, an MLP width the SiLU op does not take)."""
    c = model.cfg
    if (
        model.dtype != torch.bfloat16
        or model.embed.device.type != "cpu"
        or c.rotary_dim != c.head_dim
        or c.head_dim % 32
        or c.head_dim > 256
        or c.intermediate_size % TORCH_VECTOR_STEP
        or dispatch.best_isa() not in ("avx2", "avx512")
    ):
        return None
    stack = dispatch.layer_stack(c.heads, c.kv_heads, c.head_dim, c.eps, model.scale)
    for block, window in zip(model._layers, c.windows, strict=True):
        stack.add_layer(
            block.input_norm, block.post_norm, block.q_norm, block.k_norm, -1 if window is None else window
        )
        for linear in (block.qkv, block.o, block.gate_up, block.down):
            p = linear.packed
            stack.add_linear(
                p.mask, p.values, p.row_start, p.scale, p.rowsum, linear.bias, p.shape[1], p.group_size
            )
    return stack


def takes(model: Any, batch: int) -> bool:
    """Whether a decoding step of `batch` rows (one token each) runs as one call now: the AVX2 or AVX-512 kernels
    are in use, the batch stays on the sparse kernels and the SiLU op (as the Python block would choose them), and
    no prefill override is set."""
    return _kernels_take(model.value_kinds, batch) and batch * model.cfg.intermediate_size < TORCH_GRAIN


def whisper_build(model: Any) -> Any | None:
    """Whisper's decoder layers as a C++ `WhisperStack`, or None where the step does not apply to this model."""
    c = model.cfg
    if (
        model.dtype != torch.bfloat16
        or model.embed_tokens.device.type != "cpu"
        or c.head_dim % 32
        or c.head_dim > 256
        or dispatch.best_isa() not in ("avx2", "avx512")
    ):
        return None
    stack = dispatch.whisper_stack(c.heads, c.head_dim, model.eps, model.scale)
    for block in model._decoder:
        stack.add_layer([t for norm in block.norms for t in norm])
        for linear in (block.qkv, block.out, block.cross_q, block.cross_out, block.fc1, block.fc2):
            p = linear.packed
            stack.add_linear(
                p.mask, p.values, p.row_start, p.scale, p.rowsum, linear.bias, p.shape[1], p.group_size
            )
    return stack


def whisper_takes(model: Any, batch: int) -> bool:
    """As `takes`, for Whisper's decoder (which has no SiLU)."""
    return _kernels_take(model.value_kinds, batch)


def _kernels_take(value_kinds: set[str], batch: int) -> bool:
    """The AVX2 or AVX-512 kernels are in use, the batch stays on the sparse kernels (as SparseLinear would
    choose them) and no prefill override is set."""
    return (
        dispatch.current_isa() in ("avx2", "avx512")
        and batch <= min((dispatch.DENSE_ABOVE[kind] for kind in value_kinds), default=0)
        and not os.environ.get("SPARSEFT_DENSE_ABOVE")
    )
