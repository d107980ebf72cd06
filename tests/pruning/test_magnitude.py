import torch

from sparseft.pruning.magnitude import magnitude_prune
from sparseft.pruning.masks import NM, count_to_prune


def test_unstructured_keeps_largest_with_one_threshold() -> None:
    w = torch.randn(30, 50)
    pruned = magnitude_prune(w, 0.7)
    zeros = pruned == 0
    assert zeros.sum() == count_to_prune(0.7, w.numel())
    assert w[zeros].abs().max() <= w[~zeros].abs().min()
    assert torch.equal(pruned[~zeros], w[~zeros])


def test_n_of_m_prunes_n_per_group() -> None:
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    pruned = magnitude_prune(w, 0.5, NM(2, 4))
    assert pruned.dtype == torch.bfloat16
    assert ((pruned == 0).view(8, 16, 4).sum(-1) == 2).all()
