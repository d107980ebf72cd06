import torch

from sparseft.pruning.masks import NM
from sparseft.pruning.wanda import InputNorms, wanda_prune


def test_scores_weight_by_input_norm_within_rows() -> None:
    w = torch.ones(4, 8)
    norms = InputNorms(8)
    x = torch.zeros(10, 8)
    x[:, :3] = 5.0  # only the first three inputs carry signal
    norms.add_batch(x)
    pruned = wanda_prune(w, norms, 0.625)
    assert (pruned[:, :3] == 1).all() and (pruned[:, 3:] == 0).all()


def test_norms_accumulate_over_batches() -> None:
    x = torch.randn(3, 5, 16)
    whole, parts = InputNorms(16), InputNorms(16)
    whole.add_batch(x)
    for chunk in x:
        parts.add_batch(chunk)
    torch.testing.assert_close(whole.sq_sum, parts.sq_sum)
    assert whole.tokens == parts.tokens == 15


def test_every_row_and_group_has_target_count() -> None:
    w = torch.randn(6, 32)
    norms = InputNorms(32)
    norms.add_batch(torch.randn(20, 32))
    assert ((wanda_prune(w, norms, 0.75) == 0).sum(1) == 24).all()
    assert ((wanda_prune(w, norms, 0.5, NM(4, 8)) == 0).view(6, 4, 8).sum(-1) == 4).all()
