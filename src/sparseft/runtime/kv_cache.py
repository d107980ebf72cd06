"""A dynamic KV-cache layer that writes each new token in place.

transformers' `DynamicLayer` appends a token by concatenation, which copies the layer's whole cache at every
token: quadratic in the length of the text. `GrowingLayer` keeps keys and values in buffers with room to spare
and hands out views of their filled part; a full buffer is replaced by one a quarter larger (at least
`GROW_TOKENS` more). Whatever replaces the layer's tensors (cropping, beam reordering, batch selection, offloading,
a reset) is noticed at the next update, which starts new buffers from them. The direct decoding step
(`decode_layer`) turns each plain `DynamicLayer` it updates into this class. Decode steps alternated on TinyLlama's
shape at 70% (int8): 44.9-45.9 against 46.4-47.5 ms a token after a 1024-token prompt; no difference after 16.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

GROW_TOKENS = 256


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` (same results, same methods) whose `update` writes into spare room instead of
    concatenating."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        room: tuple[torch.Tensor, torch.Tensor] | None = self.__dict__.get("_room")
        if room is None or not self._fits(room, key_states, value_states, end):
            room = self._new_room(key_states, value_states, length, end)
        keys, values = room
        keys[:, :, length:end] = key_states
        values[:, :, length:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        self.__dict__["_room"], self.__dict__["_views"] = room, (self.keys, self.values)
        return self.keys, self.values

    def _fits(
        self,
        room: tuple[torch.Tensor, torch.Tensor],
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        end: int,
    ) -> bool:
        views = self.__dict__.get("_views", (None, None))
        keys, values = room
        return (
            views[0] is self.keys  # nothing replaced the tensors this layer handed out last
            and views[1] is self.values
            and end <= keys.shape[2]
            and keys.shape[:2] == key_states.shape[:2]
            and keys.shape[3] == key_states.shape[3]
            and values.shape[3] == value_states.shape[3]
            and keys.dtype == key_states.dtype
            and keys.device == key_states.device
        )

    def _new_room(
        self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = end + max(GROW_TOKENS, end // 4)
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty((batch, heads, size, key_states.shape[3]))
        values = value_states.new_empty((batch, heads, size, value_states.shape[3]))
        if length:
            assert self.keys is not None and self.values is not None  # a layer with tokens holds them
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        return keys, values
