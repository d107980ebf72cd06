"""A dynamic KV-cache layer that writes each new token in place.

transformers' `DynamicLayer` appends a token by concatenation, which copies the layer's whole cache at every
token: quadratic in the length of the text. `GrowingLayer` keeps keys and values in buffers with room to spare
and hands out views of their filled part; a full buffer is replaced by one a quarter larger (at least
`GROW_TOKENS` more). Whatever replaces the layer's tensors (cropping, beam reordering, batch selection, offloading,
a reset), a copy of the layer, or leaving the inference mode the buffers were made in, is noticed at the next
update, which starts new buffers from the layer's tensors. The direct decoding step (`decode_layer`) turns each
plain `DynamicLayer` it updates into this class. Decode steps alternated on TinyLlama's shape at 70% (int8):
44.9-45.9 against 46.4-47.5 ms a token after a 1024-token prompt; no difference after 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

GROW_TOKENS = 256


@dataclass(eq=False)
class _Room:
    keys: (
        torch.Tensor
    )  # (batch, heads, room, head size) buffers; the layer's tensors are views of their start
    values: torch.Tensor
    handed_out: tuple[torch.Tensor, torch.Tensor]  # the views the layer holds, unless something replaced them
    owner: int  # id() of the layer: a shallow copy of it shares the room, and must not write into it


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` (same results, same methods) whose `update` writes into spare room instead of
    concatenating."""

    _room: _Room | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        room = self._room
        if room is None or not self._fits(room, key_states, value_states, end):
            room = self._new_room(key_states, value_states, length, end)
        room.keys[:, :, length:end] = key_states
        room.values[:, :, length:end] = value_states
        self.keys, self.values = room.keys[:, :, :end], room.values[:, :, :end]
        room.handed_out = (self.keys, self.values)
        self._room = room
        return self.keys, self.values

    def _fits(self, room: _Room, key_states: torch.Tensor, value_states: torch.Tensor, end: int) -> bool:
        keys, values = room.keys, room.values
        return (
            room.owner == id(self)
            and room.handed_out[0] is self.keys
            and room.handed_out[1] is self.values
            and end <= keys.shape[2]
            and keys.shape[:2] == key_states.shape[:2]
            and keys.shape[3] == key_states.shape[3]
            and values.shape[3] == value_states.shape[3]
            and keys.dtype == key_states.dtype
            and keys.device == key_states.device
            # a buffer made under torch.inference_mode() cannot be written outside it
            and (torch.is_inference_mode_enabled() or not keys.is_inference())
        )

    def _new_room(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, end: int) -> _Room:
        size = end + max(GROW_TOKENS, end // 4)
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty((batch, heads, size, key_states.shape[3]))
        values = value_states.new_empty((batch, heads, size, value_states.shape[3]))
        if length:
            assert self.keys is not None and self.values is not None  # a layer with tokens holds them
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        return _Room(keys, values, (keys, values), id(self))
