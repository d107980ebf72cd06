"""The static KV caches of the runtime's own decoders: per layer, keys and values in buffers allocated once,
written in place at each step (no concatenation, no growth). A cache also runs the attention over what it holds,
since how the rows lie in it decides which keys each query sees.

`KVCache` holds the rows of one batch, which share one length: a left-padded row's real tokens start at
`starts[row]`; its padding sits in the cache before them and no query sees it, and its positions count from its
first real token, so every row decodes as it would alone.

`SlotCache` holds the texts of a server's running requests, one slot each and each at its own length: a request
prefills into its slot alone (`view`), and one decoding step takes a token from every running slot (`step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from sparseft.errors import SparseftError
from sparseft.runtime.models import ops


class Masks(dict[int | None, torch.Tensor | None]):
    """Attention masks by sliding window (None: full attention), each made on first use: a forward makes the
    ones its layers ask for, once."""

    def __init__(self, make: Callable[[int | None], torch.Tensor | None]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, window: int | None) -> torch.Tensor | None:
        self[window] = mask = self._make(window)
        return mask


class Cache(Protocol):
    """What a decoder's forward asks of a cache, in this order: `begin` (room for the tokens), their positions
    (`shared_position` where every row is at the same one, else `positions`) and attention `masks`, per layer
    `attend`, then `advance` past them."""

    def begin(self, batch: int, tokens: int, attention_mask: torch.Tensor | None) -> None: ...

    def positions(self, tokens: int) -> torch.Tensor: ...

    def shared_position(self) -> int | None: ...

    def masks(self, tokens: int) -> Masks: ...

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        masks: Masks,
    ) -> torch.Tensor: ...

    def advance(self, tokens: int) -> None: ...


def _one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row (B, H, 1, D) over all of k, v: the decoding op where it runs, else SDPA."""
    if ops.op_attends(q):
        return ops.decode_attention(q, k, v, scale)
    return ops.attention(q, k, v, scale)


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

    def shared_position(self) -> int | None:
        """The position of the next token where every row is at the same one (no padding), else None."""
        return None if self.padded else self.length

    def masks(self, tokens: int) -> Masks:
        """The attention masks (B, 1, T, length + T) of the next `tokens` over the cache, made when asked for (a
        decoding step asks for none)."""
        length, end, rows = self.length, self.length + tokens, list(self.starts)

        def make(window: int | None) -> torch.Tensor:
            keys = torch.arange(end)
            queries = torch.arange(length, end)
            starts = torch.tensor(rows)
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

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        masks: Masks,
    ) -> torch.Tensor:
        """Cache the new keys and values (B, Hkv, T, D) of `layer`; the attention (B, T, H, D) of the queries q
        (B, H, T, D) over the row's cached keys that each sees."""
        end = self.length + q.shape[2]
        first = 0 if window is None else max(0, end - window)
        if q.shape[2] == 1 and not self.padded and ops.op_attends(q):
            # a decoding step, every row over all its cached keys: the writes and the attention in one op call
            return ops.store_and_attend(
                q, k, v, self.keys[layer], self.values[layer], self.length, first, scale
            )
        keys, values = self.store(layer, k, v)
        if q.shape[2] == 1 and not self.padded:
            return ops.attention(q, keys[:, :, first:], values[:, :, first:], scale)
        if q.shape[2] == 1:  # left-padded rows: each over its own keys, as it would decode alone
            rows = []
            for row, start in enumerate(self.starts):
                first = start if window is None else max(start, end - window)
                span = slice(row, row + 1)
                rows.append(_one_query(q[span], keys[span, :, first:], values[span, :, first:], scale))
            return torch.cat(rows)
        return ops.attention(q, keys, values, scale, masks[window])

    def advance(self, tokens: int) -> None:
        self.length += tokens


@dataclass(eq=False)
class SlotCache:
    keys: list[torch.Tensor]  # per layer (slots, kv heads, capacity, head size)
    values: list[torch.Tensor]
    lengths: list[int]  # per slot: tokens cached

    @classmethod
    def empty(
        cls, layers: int, slots: int, kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype
    ) -> SlotCache:
        base = KVCache.empty(layers, slots, kv_heads, capacity, head_dim, dtype)
        return cls(base.keys, base.values, [0] * slots)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def view(self, slot: int) -> KVCache:
        """Slot `slot` as a one-row cache over the same buffers, to prefill (a chunk of) its prompt; `keep`
        takes its length back."""
        span = slice(slot, slot + 1)
        return KVCache([k[span] for k in self.keys], [v[span] for v in self.values], [0], self.lengths[slot])

    def keep(self, slot: int, view: KVCache) -> None:
        self.lengths[slot] = view.length

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    def step(self, slots: Sequence[int]) -> SlotStep:
        """The cache of one decoding step: one new token for each of `slots`, in that order."""
        return SlotStep(self, list(slots))


@dataclass(eq=False)
class SlotStep:
    """One decoding step over some slots of a `SlotCache`: row i of the batch is slot `slots[i]`, at its own
    length. Each row attends over its own slot, so it decodes exactly as it would as the only row."""

    cache: SlotCache
    slots: list[int]

    def begin(self, batch: int, tokens: int, attention_mask: torch.Tensor | None) -> None:
        if tokens != 1 or batch != len(self.slots) or attention_mask is not None:
            raise SparseftError(
                f"a step takes one token for each of its {len(self.slots)} slots, got {batch} x {tokens}"
            )
        full = [s for s in self.slots if self.cache.lengths[s] >= self.cache.capacity]
        if full:
            raise SparseftError(f"slots {full} hold {self.cache.capacity} tokens, all the cache has room for")

    def positions(self, tokens: int) -> torch.Tensor:
        return torch.tensor([[self.cache.lengths[s]] for s in self.slots])

    def shared_position(self) -> int | None:
        lengths = {self.cache.lengths[s] for s in self.slots}
        return lengths.pop() if len(lengths) == 1 else None

    def masks(self, tokens: int) -> Masks:
        return Masks(lambda window: None)  # one query per row over its own keys: nothing to mask

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        window: int | None,
        masks: Masks,
    ) -> torch.Tensor:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        rows = []
        for row, slot in enumerate(self.slots):
            end = self.cache.lengths[slot] + 1
            keys[slot, :, end - 1] = k[row, :, 0]
            values[slot, :, end - 1] = v[row, :, 0]
            first = 0 if window is None else max(0, end - window)
            span = slice(slot, slot + 1)
            rows.append(
                _one_query(q[row : row + 1], keys[span, :, first:end], values[span, :, first:end], scale)
            )
        return torch.cat(rows)

    def advance(self, tokens: int) -> None:
        for slot in self.slots:
            self.cache.lengths[slot] += tokens
