"""Runtime test helpers: weights with the awkward cases the kernels must handle (an empty row, a fully dense
row, sizes that are not multiples of 32 or 64), and a pruned tiny Llama."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers

from sparseft.models import find_targets
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.tiny import tiny_config


def _awkward_weight(rows: int, cols: int, sparsity: float = 0.7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    weight[torch.rand(rows, cols, generator=g) < sparsity] = 0
    weight[0] = 0  # an empty row
    if rows > 1:
        weight[-1] = torch.randn(cols, generator=g)  # a fully dense row
    return weight


@pytest.fixture
def awkward_weight() -> Callable[..., torch.Tensor]:
    return _awkward_weight


def _pruned_model(
    arch: str = "llama", sparsity: float = 0.7, **extra: object
) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=320, hidden=96, layers=2, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for module in find_targets(model).values():
            module.weight.copy_(magnitude_prune(module.weight, sparsity))
    return model


@pytest.fixture
def pruned_model() -> Callable[..., transformers.PreTrainedModel]:
    """A tiny model in bf16 whose block linears are magnitude-pruned to `sparsity`."""
    return _pruned_model
