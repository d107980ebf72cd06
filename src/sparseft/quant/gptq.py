"""GPTQ (Frantar et al., 2023) that respects a sparsity mask: quantize a weight matrix column by column and
spread each column's rounding error onto the columns not yet quantized, through the upper Cholesky factor of
H⁻¹ (the same OBS update SparseGPT uses, see `sparseft.pruning.obs`).

Pruned weights (exactly zero on entry) are quantized to exactly zero whatever the updates did to them, and their
error is spread like any other, so the kept weights absorb it and the mask never changes. Group scales are taken
when the walk reaches a group, from the updated kept weights of that group (as in the reference code); blocks
are whole groups, so a group's weights have all received their updates by then.
"""

from __future__ import annotations

import torch

from sparseft.pruning.obs import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPENING, inverse_cholesky
from sparseft.quant.spec import QuantizedWeight, QuantSpec, absmax_scale


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    scale_dtype: torch.dtype | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening: float = DEFAULT_DAMPENING,
    layer: str = "layer",
) -> QuantizedWeight:
    """Quantize `weight` (out_features, in_features) given H = 2XXᵀ/n of its inputs; zeros stay zero. `layer`
    names the weight in errors."""
    scale_dtype = scale_dtype or weight.dtype
    rows, columns = weight.shape
    w = weight.detach().to(torch.float32).clone()
    u = inverse_cholesky(hessian.to(w.device), w, dampening, layer)  # also zeroes columns of dead inputs
    keep = w != 0
    group = spec.group_size
    if group is not None:
        block_size = max(block_size // group, 1) * group
        scale = torch.ones(rows, spec.groups(columns), dtype=scale_dtype, device=w.device)
    else:
        scale = absmax_scale(w, spec, scale_dtype)
    q = torch.zeros(rows, columns, dtype=torch.int8, device=w.device)

    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        w_block = w[:, start:end].clone()
        keep_block = keep[:, start:end]
        u_block = u[start:end, start:end]
        err_block = torch.zeros_like(w_block)
        for i in range(end - start):
            column = start + i
            if group is not None and column % group == 0:
                kept = w_block[:, i : i + group] * keep_block[:, i : i + group]
                scale[:, column // group] = absmax_scale(kept, QuantSpec(spec.bits, None), scale_dtype)[:, 0]
            s = scale[:, 0 if group is None else column // group].to(torch.float32)
            col = w_block[:, i]
            q_col = torch.round(col / s).clamp_(spec.qmin, spec.qmax) * keep_block[:, i]
            err = (col - q_col * s) / u_block[i, i]
            w_block[:, i:].sub_(err.unsqueeze(1) * u_block[i, i:].unsqueeze(0))
            err_block[:, i] = err
            q[:, column] = q_col.to(torch.int8)
        w[:, end:].sub_(err_block @ u[start:end, end:])
    return QuantizedWeight(q, scale, spec)
