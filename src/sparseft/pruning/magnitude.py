"""Magnitude pruning: keep the largest |w|, one threshold per layer (unstructured) or per group (N:M)."""

from __future__ import annotations

import torch

from sparseft.pruning.masks import NM, count_to_prune, lowest_k, lowest_n_of_m


def magnitude_prune(weight: torch.Tensor, sparsity: float, structure: NM | None = None) -> torch.Tensor:
    """Return a pruned copy of `weight` (out_features, in_features)."""
    scores = weight.abs()
    if structure is not None:
        pruned = lowest_n_of_m(scores, structure)
    else:
        pruned = lowest_k(scores, count_to_prune(sparsity, weight.numel()))
    return weight.masked_fill(pruned, 0)
