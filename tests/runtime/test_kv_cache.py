"""A GrowingLayer gives what transformers' DynamicLayer gives, update for update, through whatever else is done to
the cache in between, and adds a token without copying the cache once it has room."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from sparseft.runtime import kv_cache
from sparseft.runtime.kv_cache import GrowingLayer


def _tokens(batch: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 2, count, 8, generator=g), torch.randn(batch, 2, count, 4, generator=g)


EDITS: dict[str, Callable[[DynamicLayer], None]] = {
    "nothing": lambda layer: None,
    "crop": lambda layer: layer.crop(-2),
    "reorder (beam search)": lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
    "batch selection": lambda layer: layer.batch_select_indices(torch.tensor([1])),
    "batch repetition": lambda layer: layer.batch_repeat_interleave(2),
    "reset": lambda layer: layer.reset(),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_updates_give_what_a_dynamic_layer_gives(edit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_cache, "GROW_TOKENS", 3)  # the buffers fill and are replaced several times
    mine, theirs = GrowingLayer(), DynamicLayer()
    counts = [5, 1, 1, 1, 1, 4, 1, 1, 1, 1, 1, 1]
    for step, count in enumerate(counts):
        if step == 6:
            EDITS[edit](mine)
            EDITS[edit](theirs)
        batch = theirs.keys.shape[0] if theirs.is_initialized and theirs.keys.numel() else 2
        k, v = _tokens(batch, count, seed=step)
        got, expected = mine.update(k, v), theirs.update(k, v)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert mine.get_seq_length() == theirs.get_seq_length()


def test_a_cache_begun_in_inference_mode_goes_on_outside_it() -> None:
    # generate() only turns gradients off: a chat may fill the cache under inference_mode, then go on without it
    mine, theirs = GrowingLayer(), DynamicLayer()
    with torch.inference_mode():
        for layer in (mine, theirs):
            layer.update(*_tokens(1, 4, seed=0))
    with torch.no_grad():
        got, expected = mine.update(*_tokens(1, 1, seed=1)), theirs.update(*_tokens(1, 1, seed=1))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_a_shallow_copy_writes_into_its_own_room() -> None:
    layer = GrowingLayer()
    layer.update(*_tokens(1, 4, seed=0))
    twin = copy.copy(layer)
    keys, _ = layer.update(*_tokens(1, 1, seed=1))
    twin.update(*_tokens(1, 1, seed=2))
    assert torch.equal(keys[:, :, -1:], _tokens(1, 1, seed=1)[0])  # not overwritten by the twin's token


def test_a_token_is_written_in_place_while_there_is_room() -> None:
    layer = GrowingLayer()
    keys, _ = layer.update(*_tokens(1, 4, seed=0))
    for step in range(1, 6):
        before = keys
        keys, values = layer.update(*_tokens(1, 1, seed=step))
        assert keys.data_ptr() == before.data_ptr()  # the same buffer: nothing was copied
        assert torch.equal(keys[:, :, :-1], before)
    assert keys.shape[2] == 9 and values.shape == (1, 2, 9, 4)
