"""Choosing which weights to remove from a score matrix: per layer, per row, or N:M.

All functions return a bool tensor that is True where a weight is *pruned*. "N:M" in sparseft means N zeros in
every M consecutive input columns (2:4 and 16:32 are 50% sparse); some tools count the nonzeros instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseft.errors import SparseftError


@dataclass(frozen=True)
class NM:
    """N zeros in every group of M consecutive input columns."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    def check_columns(self, columns: int, layer: str = "layer") -> None:
        if columns % self.m:
            raise SparseftError(
                f"N:M structure {self} needs the input size to be a multiple of {self.m}, but {layer} has "
                f"{columns} inputs; choose another M or --ignore that layer"
            )


def parse_structure(text: str | None) -> NM | None:
    """Parse "N:M"; None, "" and "unstructured" mean unstructured."""
    if text is None or text in ("", "unstructured"):
        return None
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise SparseftError(f"structure {text!r} is not of the form N:M (for example 2:4)")
    n, m = int(parts[0]), int(parts[1])
    if not 0 < n < m:
        raise SparseftError(f"structure {text!r} needs 0 < N < M (N zeros in every M consecutive inputs)")
    return NM(n, m)


def count_to_prune(sparsity: float, numel: int) -> int:
    """Round half up, so 0.5 of 7 prunes 4 everywhere, whatever the float error in `sparsity * numel`."""
    return int(sparsity * numel + 0.5 + 1e-9)


def lowest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores of the whole tensor (ties broken by position, deterministically)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.flatten(), k, largest=False, sorted=False).indices
        pruned[idx] = True
    return pruned.view_as(scores)


def lowest_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the same number of lowest scores in every row."""
    k = count_to_prune(sparsity, scores.shape[1])
    pruned = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(scores, k, dim=1, largest=False, sorted=False).indices
        pruned.scatter_(1, idx, True)
    return pruned


def lowest_n_of_m(scores: torch.Tensor, nm: NM) -> torch.Tensor:
    """Prune the N lowest scores in every group of M consecutive columns of every row."""
    rows, cols = scores.shape
    nm.check_columns(cols)
    groups = scores.reshape(rows, cols // nm.m, nm.m)
    idx = torch.topk(groups, nm.n, dim=2, largest=False, sorted=False).indices
    pruned = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True)
    return pruned.reshape(rows, cols)
