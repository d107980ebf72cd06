import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.pruning.masks import (
    NM,
    count_to_prune,
    lowest_k,
    lowest_n_of_m,
    lowest_per_row,
    parse_structure,
)


def test_parse_structure_accepts_n_zeros_of_m() -> None:
    assert parse_structure("2:4") == NM(2, 4)
    assert parse_structure("16:64").sparsity == 0.25
    assert parse_structure(None) is None
    assert parse_structure("unstructured") is None


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "a:b", "2:4:8"])
def test_parse_structure_rejects_bad_text(text: str) -> None:
    with pytest.raises(SparseftError, match="N:M|0 < N < M"):
        parse_structure(text)


def test_lowest_k_prunes_exactly_k_smallest() -> None:
    scores = torch.randperm(100).float().view(10, 10)
    pruned = lowest_k(scores, 37)
    assert pruned.sum() == 37
    assert scores[pruned].max() < scores[~pruned].min()


def test_lowest_per_row_same_count_in_every_row() -> None:
    scores = torch.rand(7, 20)
    pruned = lowest_per_row(scores, 0.7)
    assert (pruned.sum(dim=1) == count_to_prune(0.7, 20)).all()


def test_lowest_n_of_m_every_group_valid() -> None:
    scores = torch.rand(5, 32)
    pruned = lowest_n_of_m(scores, NM(3, 8))
    groups = pruned.view(5, 4, 8)
    assert (groups.sum(dim=2) == 3).all()
    values = scores.view(5, 4, 8)
    assert (values.masked_fill(~groups, -1).amax(2) <= values.masked_fill(groups, 2).amin(2)).all()


def test_lowest_n_of_m_rejects_columns_not_divisible() -> None:
    with pytest.raises(SparseftError, match="multiple of 8"):
        lowest_n_of_m(torch.rand(2, 12), NM(2, 8))
