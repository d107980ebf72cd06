"""The Llama-family decoding step in one C++ call (kernels/decode_step.cpp): a token through every layer without
returning to Python between ops. It runs the ops of `LlamaDecoder._block` in the same order, so it gives the same
bits; `takes` says where it applies, and everything else keeps the Python block."""

from __future__ import annotations

import os
from typing import Any

import torch

from sparseft.runtime import dispatch
from sparseft.runtime.models.ops import TORCH_GRAIN, TORCH_VECTOR_STEP

# `model` below is a `LlamaDecoder` (models/llama.py, which imports this module).


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
    """Whether a decoding step of `batch` rows (one token each, one shared position) runs as one call now: the
    AVX2 or AVX-512 kernels are in use, the batch stays on the sparse kernels and the SiLU op (as the Python block
    would choose them), and no prefill override is set."""
    return (
        dispatch.current_isa() in ("avx2", "avx512")
        and batch <= min((dispatch.DENSE_ABOVE[kind] for kind in model.value_kinds), default=0)
        and batch * model.cfg.intermediate_size < TORCH_GRAIN
        and not os.environ.get("SPARSEFT_DENSE_ABOVE")
    )
