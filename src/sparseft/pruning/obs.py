"""The optimal-brain-surgeon (OBS) maths that SparseGPT and GPTQ share: the Hessian H = 2 X Xᵀ / n of a layer's
inputs, and the upper Cholesky factor of its damped inverse, through which both spread the error of each removed or
rounded column onto the columns not yet processed.
"""

from __future__ import annotations

import torch

from sparseft.errors import SparseftError

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
