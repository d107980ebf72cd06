import math

import pytest
import torch

from sparseft.pruning.magnitude import magnitude_prune
from sparseft.pruning.masks import NM, count_to_prune
from sparseft.pruning.obs import Hessian
from sparseft.pruning.sparsegpt import sparsegpt_prune
from sparseft.pruning.wanda import InputNorms, wanda_prune


def correlated_inputs(tokens: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated features of very different scales, as in real activations."""
    gen = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, columns // 4, generator=gen)
    mixing = torch.randn(columns // 4, columns, generator=gen)
    scales = torch.exp(torch.randn(columns, generator=gen))
    return (latent @ mixing + 0.1 * torch.randn(tokens, columns, generator=gen)) * scales


def hessian_of(x: torch.Tensor) -> Hessian:
    h = Hessian(x.shape[-1])
    h.add_batch(x)
    return h


def output_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ w.t() - x @ pruned.t()) ** 2).sum())


def test_sparsity_zero_returns_weights_unchanged() -> None:
    w = torch.randn(16, 32)
    assert torch.equal(sparsegpt_prune(w, hessian_of(correlated_inputs(64, 32)).matrix, 0.0), w)


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_error_sparsegpt_below_wanda_below_magnitude(sparsity: float) -> None:
    x = correlated_inputs(512, 128)
    w = torch.randn(64, 128)
    norms = InputNorms(128)
    norms.add_batch(x)
    e_sgpt = output_error(w, sparsegpt_prune(w, hessian_of(x).matrix, sparsity), x)
    e_wanda = output_error(w, wanda_prune(w, norms, sparsity), x)
    e_mag = output_error(w, magnitude_prune(w, sparsity), x)
    assert e_sgpt < e_wanda < e_mag


def test_exact_sparsity_and_valid_n_of_m() -> None:
    x = correlated_inputs(256, 96)
    w = torch.randn(20, 96)
    h = hessian_of(x).matrix
    unstructured = sparsegpt_prune(w, h, 0.7, block_size=32)
    assert int((unstructured == 0).sum()) == count_to_prune(0.7, w.numel())
    nm = sparsegpt_prune(w, h, 0.5, NM(2, 4), block_size=32)
    assert ((nm == 0).view(20, 24, 4).sum(-1) == 2).all()


def test_keeps_dtype_and_zeroes_dead_inputs() -> None:
    x = correlated_inputs(128, 64)
    x[:, 5] = 0.0
    w = torch.randn(8, 64, dtype=torch.bfloat16)
    out = sparsegpt_prune(w, hessian_of(x).matrix, 0.5)
    assert out.dtype == torch.bfloat16
    assert (out[:, 5] == 0).all()


def reference_obs(w: torch.Tensor, h: torch.Tensor, sparsity: float, block: int) -> torch.Tensor:
    """Column-by-column OBS with an explicit inverse Hessian, eliminated one column at a time (float64)."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += 0.01 * torch.diag(h).mean() * torch.eye(cols, dtype=torch.float64)
    h_inv = torch.linalg.inv(h)

    def eliminate(m: torch.Tensor, i: int) -> torch.Tensor:
        return m - torch.outer(m[:, i], m[i, :]) / m[i, i]

    # [H_F⁻¹]_ii for F = columns i.. : the denominators of the selection score
    d2, m = [], h_inv.clone()
    for i in range(cols):
        d2.append(float(m[i, i]))
        m = eliminate(m, i)
    d2_t = torch.tensor(d2, dtype=torch.float64)

    m = h_inv.clone()
    for start in range(0, cols, block):
        end = min(start + block, cols)
        k = math.floor(sparsity * rows * end + 0.5) - math.floor(sparsity * rows * start + 0.5)
        scores = (w[:, start:end] ** 2 / d2_t[start:end]).flatten()
        pruned = torch.zeros(scores.numel(), dtype=torch.bool)
        pruned[torch.argsort(scores)[:k]] = True
        pruned = pruned.view(rows, end - start)
        for i in range(start, end):
            removed = torch.where(pruned[:, i - start], w[:, i], torch.zeros_like(w[:, i]))
            w -= torch.outer(removed / m[i, i], m[i, :])
            w[pruned[:, i - start], i] = 0.0
            m = eliminate(m, i)
    return w


@pytest.mark.parametrize("block", [16, 48])
def test_blocked_matches_column_by_column_reference(block: int) -> None:
    x = correlated_inputs(400, 48, seed=3)
    w = torch.randn(12, 48)
    h = hessian_of(x).matrix
    fast = sparsegpt_prune(w, h, 0.6, block_size=block)
    slow = reference_obs(w, h, 0.6, block)
    # elimination leaves ~1e-17 where exact arithmetic gives 0 in the reference's earlier columns
    assert torch.equal(fast == 0, slow.abs() < 1e-9)
    torch.testing.assert_close(fast.double(), slow, rtol=2e-3, atol=2e-3)
