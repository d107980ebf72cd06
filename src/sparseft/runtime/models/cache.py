"""The static KV cache of the runtime's own decoders: per layer, keys and values of every row in buffers
allocated once for the whole text, written in place at each step (no concatenation, no growth).

Rows of a batch share one length. A left-padded row's real tokens start at `starts[row]`; its padding sits in
the cache before them and no query sees it, and its positions count from its first real token, so every row
decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparseft.errors import SparseftError


class Masks(dict[int | None, torch.Tensor | None]):
    """Attention masks by sliding window (None: full attention), each made on first use: a forward makes the
    ones its layers ask for, once."""

    def __init__(self, make: Callable[[int | None], torch.Tensor | None]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, window: int | None) -> torch.Tensor | None:
        self[window] = mask = self._make(window)
        return mask


@dataclass(eq=False)
class KVCache:
    keys: list[torch.Tensor]  # per layer (batch, kv heads, capacity, head size)
    values: list[torch.Tensor]
    starts: list[int]  # per row: the cache index of its first real token
    length: int = 0  # tokens cached per row, padding included

    @classmethod
    def empty(
        cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype
    ) -> KVCache:
        if capacity < 1 or batch < 1:
            raise SparseftError(f"a KV cache needs at least one row and one token, got {batch} x {capacity}")
        shape = (batch, kv_heads, capacity, head_dim)
        return cls(
            [torch.empty(shape, dtype=dtype) for _ in range(layers)],
            [torch.empty(shape, dtype=dtype) for _ in range(layers)],
            [0] * batch,
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def padded(self) -> bool:
        return any(self.starts)

    def begin(self, batch: int, tokens: int, attention_mask: torch.Tensor | None) -> None:
        """Check that `tokens` more fit; take the rows' padding from the first call's `attention_mask`."""
        if batch != len(self.starts):
            raise SparseftError(f"the cache holds {len(self.starts)} rows, the input {batch}")
        if self.length + tokens > self.capacity:
            raise SparseftError(
                f"{self.length} cached + {tokens} new tokens exceed the cache's {self.capacity}; make the cache "
                "longer (generate: fewer max_new_tokens or a shorter prompt)"
            )
        if attention_mask is None:
            return
        mask = attention_mask.bool()
        if self.length:
            if not bool(mask[:, -tokens:].all()):
                raise SparseftError("only the first input of a cached text may be padded (left padding)")
            return
        if tuple(mask.shape) != (batch, tokens):
            raise SparseftError(f"attention_mask must be {(batch, tokens)}, got {tuple(mask.shape)}")
        real = mask.long()
        if bool((real[:, 1:] < real[:, :-1]).any()) or not bool(mask[:, -1].all()):
            raise SparseftError("attention_mask must pad on the left (zeros, then ones, ending in a one)")
        self.starts = (tokens - real.sum(-1)).tolist()

    def row(self, row: int) -> KVCache:
        """Row `row` from its first real token on, as a cache of its own over the same buffers: a padded row's
        prompt then fills the cache exactly as it would alone."""
        start = self.starts[row]
        return KVCache(
            [k[row : row + 1, :, start:] for k in self.keys],
            [v[row : row + 1, :, start:] for v in self.values],
            [0],
        )

    def positions(self, tokens: int) -> torch.Tensor:
        """Positions (B, T) of the next `tokens`, counted from each row's first real token."""
        steps = torch.arange(self.length, self.length + tokens)
        return (steps[None, :] - torch.tensor(self.starts)[:, None]).clamp(min=0)

    def masks(self, tokens: int) -> Masks:
        """The attention masks (B, 1, T, length + T) of the next `tokens` over the cache."""
        end = self.length + tokens
        keys = torch.arange(end)
        queries = torch.arange(self.length, end)
        starts = torch.tensor(self.starts)

        def make(window: int | None) -> torch.Tensor:
            seen = keys[None, :] <= queries[:, None]
            if window is not None:
                seen = seen & (keys[None, :] > queries[:, None] - window)
            seen = seen[None] & (keys[None, None, :] >= starts[:, None, None])
            # a padding query sees itself (see llama._positions_and_mask)
            seen = seen | (keys[None, None, :] == queries[None, :, None])
            return seen[:, None]

        return Masks(make)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, Hkv, T, D) of `layer`; its cached keys and values so far."""
        end = self.length + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]
