"""Wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2 and compare within each output row; no weight update."""

from __future__ import annotations

import torch

from sparseft.pruning.masks import NM, lowest_n_of_m, lowest_per_row


class InputNorms:
    """Accumulates the squared norm of every input feature over all calibration tokens."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.sq_sum = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sq_sum += (x * x).sum(dim=0)
        self.tokens += x.shape[0]


def wanda_prune(
    weight: torch.Tensor, norms: InputNorms, sparsity: float, structure: NM | None = None
) -> torch.Tensor:
    """Return a pruned copy of `weight` (out_features, in_features)."""
    scores = weight.abs().float() * norms.sq_sum.sqrt().unsqueeze(0)
    pruned = lowest_n_of_m(scores, structure) if structure is not None else lowest_per_row(scores, sparsity)
    return weight.masked_fill(pruned, 0)
