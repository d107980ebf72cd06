"""SparseGPT (Frantar & Alistarh, 2023): prune with a second-order (OBS) update of the weights that remain.

Pure tensor mathematics, free of model plumbing: `sparsegpt_prune` prunes one weight matrix given H = 2 X Xᵀ / n of
its inputs (collected by `sparseft.pruning.obs.Hessian`). Each remaining column absorbs the error of removed ones
through the upper Cholesky factor U of H⁻¹ (`obs.inverse_cholesky`), whose row i is the OBS update direction once
columns < i are eliminated, and whose diagonal U_ii² is the matching [H_F⁻¹]_ii.
"""

from __future__ import annotations

import torch

from sparseft.pruning.masks import NM, count_to_prune, lowest_k
from sparseft.pruning.obs import DEFAULT_BLOCK_SIZE, DEFAULT_DAMPENING, inverse_cholesky


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: NM | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dampening: float = DEFAULT_DAMPENING,
    layer: str = "layer",
) -> torch.Tensor:
    """Return a pruned and updated copy of `weight` (out_features, in_features), in its dtype. `layer` names
    the weight in errors.

    Unstructured: in each block of columns, remove the lowest w² / U_jj² over the whole rows x block slice,
    with the count per block rounded cumulatively so the layer gets exactly round(sparsity * numel) zeros.
    N:M: per row, the N lowest scores of each group of M columns.
    """
    rows, cols = weight.shape
    if structure is not None:
        structure.check_columns(cols)
        block_size = max(block_size // structure.m, 1) * structure.m
    if sparsity == 0 and structure is None:
        return weight.detach().clone()
    w = weight.detach().to(torch.float32).clone()
    u = inverse_cholesky(hessian.to(w.device), w, dampening, layer)
    # Work on Wᵀ so that each column of W is a contiguous row: the per-column update is then one BLAS rank-1
    # update (addr_) over contiguous memory, which is what makes this loop fast on CPUs.
    wt = w.t().contiguous()

    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = wt[start:end]  # a view: updates land in wt
        u_block = u[start:end, start:end]
        d = torch.diag(u_block)
        err_block = torch.empty_like(block)
        if structure is None:
            k = count_to_prune(sparsity, rows * end) - count_to_prune(sparsity, rows * start)
            pruned = lowest_k(block**2 / d.unsqueeze(1) ** 2, k)
        else:
            pruned = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if structure is not None and i % structure.m == 0:
                scores = block[i : i + structure.m] ** 2 / d[i : i + structure.m].unsqueeze(1) ** 2
                idx = torch.topk(scores, structure.n, dim=0, largest=False).indices
                pruned[i : i + structure.m].scatter_(0, idx, True)
            removed = block[i] * pruned[i]
            err = removed / d[i]
            err_block[i] = err
            block[i + 1 :].addr_(u_block[i, i + 1 :], err, alpha=-1.0)
            block[i] -= removed
        wt[end:].addmm_(u[start:end, end:].t(), err_block, alpha=-1.0)
    return wt.t().to(weight.dtype)
