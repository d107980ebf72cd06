"""SparseGPT (Frantar & Alistarh, 2023): prune with a second-order (OBS) update of the weights that remain.

Pure tensor mathematics, free of model plumbing: `Hessian` collects H = 2 X Xᵀ / n from a layer's inputs and
`sparsegpt_prune` prunes one weight matrix given H. Each remaining column absorbs the error of removed ones through
the upper Cholesky factor U of H⁻¹, whose row i is the OBS update direction once columns < i are eliminated, and
whose diagonal U_ii² is the matching [H_F⁻¹]_ii.
"""

from __future__ import annotations

import torch

from sparseft.errors import SparseftError
from sparseft.pruning.masks import NM, count_to_prune, lowest_k

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPENING = 0.01


class Hessian:
    """Running H = 2 X Xᵀ / n in float32, over every token the layer has seen."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.matrix = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.matrix.device, torch.float32)
        count = x.shape[0]
        total = self.tokens + count
        # Keep a mean rather than a sum so H stays well scaled however many tokens arrive.
        self.matrix.mul_(self.tokens / total)
        self.matrix.addmm_(x.t(), x, alpha=2.0 / total)
        self.tokens = total


def inverse_cholesky(
    hessian: torch.Tensor, weight: torch.Tensor, dampening: float, layer: str = "layer"
) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, after fixing dead inputs; zeroes the dead columns of `weight`.
    `layer` names the weight in errors."""
    if not torch.isfinite(hessian).all():  # float16 activations overflow to inf, and inf - inf is NaN
        raise SparseftError(
            f"the calibration inputs of {layer} hold inf or NaN, so it cannot be pruned from them; load the model "
            f"in float32 (--dtype float32), or leave the layer dense with --ignore {layer}"
        )
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    damp = dampening * torch.mean(torch.diag(h))
    h.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(h)  # info > 0: not positive definite
    if int(info) == 0:
        upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if int(info) != 0:
        raise SparseftError(
            f"the Hessian of {layer}'s inputs is not positive definite (dampening {dampening}); raise the dampening "
            f"(`dampening` in a prune recipe), calibrate on more samples (--num-samples), load the model in float32 "
            f"(--dtype float32), or leave the layer dense with --ignore {layer}"
        )
    return upper


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
