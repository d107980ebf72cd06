"""The runtime's internal weight layout, made from the bitmask archive's tensors or from a dense weight.

The archive (the layout in sparseft/formats.py) stores a weight (R, C) as its nonzeros in row-major order, a bitmask of
ceil(C/8) bytes per row (least significant bit first) and the nonzeros before each row. The kernels keep the
same order and only change the framing: each mask row is padded to whole 64-bit words (read as little-endian,
byte b bit i is word b // 8 bit 8 * (b % 8) + i, the same column), the offsets get the total appended, and the
values get 64 zero bytes of tail so full-vector loads never read past the buffer. int8 values carry one fp32
scale per output row and the row sums of the int8 values (for the u8 x s8 zero-point correction).
This layout is internal and may change; the archive may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sparseft.errors import SparseftError

Values = Literal["bf16", "int8"]
PAD_BYTES = 64


@dataclass
class Packed:
    shape: tuple[int, int]
    mask: torch.Tensor  # int64 (rows, words)
    values: torch.Tensor  # bfloat16 or int8, 1-D, nonzeros + padding
    row_start: torch.Tensor  # int64 (rows + 1)
    scale: torch.Tensor | None = None  # float32 (rows), int8 only
    rowsum: torch.Tensor | None = None  # int32 (rows), int8 only
    # made by the packers here, whose offsets agree with the mask; others are checked before the kernels use them
    checked: bool = field(default=False, repr=False, compare=False)

    @property
    def kind(self) -> Values:
        return "int8" if self.values.dtype == torch.int8 else "bf16"

    @property
    def nnz(self) -> int:
        return int(self.row_start[-1])

    def rows(self, start: int, stop: int) -> Packed:
        """Rows [start, stop) over the same buffers (offsets rebased; the values' padding is still behind)."""
        first = int(self.row_start[start])
        return Packed(
            (stop - start, self.shape[1]),
            self.mask[start:stop],
            self.values[first:],
            self.row_start[start : stop + 1] - first,
            None if self.scale is None else self.scale[start:stop],
            None if self.rowsum is None else self.rowsum[start:stop],
            self.checked,
        )

    def nbytes(self) -> int:
        tensors = [self.mask, self.values, self.row_start, self.scale, self.rowsum]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def bitmask_of(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The archive's tensors for a dense (R, C) weight: shape, compressed, bitmask, row_offsets."""
    rows, cols = weight.shape
    nonzero = weight != 0
    padded = torch.nn.functional.pad(nonzero, (0, -cols % 8)).reshape(rows, -1, 8).to(torch.uint8)
    bitmask = (padded << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    counts = nonzero.sum(1)
    return {
        "shape": torch.tensor([rows, cols], dtype=torch.int64),
        "compressed": weight[nonzero],
        "bitmask": bitmask,
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def _row_counts(bitmask: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Set bits per row, a block of rows at a time so the temporaries stay small on large weights."""
    counts = [_POPCOUNT[bitmask[r : r + block].long()].sum(1) for r in range(0, bitmask.shape[0], block)]
    return torch.cat(counts) if counts else torch.zeros(0, dtype=torch.int64)


def _row_ids(row_start: torch.Tensor) -> torch.Tensor:
    counts = row_start[1:] - row_start[:-1]
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


def quantize_rows(values: torch.Tensor, row_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row over a row-major packed array: scale = max|w| / 127."""
    rows = len(row_start) - 1
    ids = _row_ids(row_start)
    v = values.float()
    absmax = torch.zeros(rows).scatter_reduce_(0, ids, v.abs(), "amax")
    scale = absmax / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(v / safe[ids]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _padded(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` as `dtype` followed by PAD_BYTES zero bytes. No copy when the storage already holds that zero
    tail (the archive reader reads values straight into such a buffer)."""
    size = torch.tensor([], dtype=dtype).element_size()
    n, pad = values.numel(), PAD_BYTES // size
    storage = values.untyped_storage()
    if (
        values.dtype == dtype
        and values.is_contiguous()
        and values.storage_offset() == 0
        and storage.nbytes() >= (n + pad) * size
    ):
        whole = torch.empty(0, dtype=dtype).set_(storage, 0, (n + pad,), (1,))
        if not bool(whole[n:].any()):
            return whole
    return torch.cat([values.to(dtype).reshape(-1), torch.zeros(pad, dtype=dtype)])


INT8_MAX_COLUMNS = 65536


def pack_bitmask(
    shape: torch.Tensor | tuple[int, int],
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    values: Values = "bf16",
    scale: torch.Tensor | None = None,
    name: str = "weight",
) -> Packed:
    """Pack the archive's tensors of one weight. `compressed` may be float (converted, or quantized per row
    for int8) or int8 with its per-row `scale` (an archive quantized per channel)."""
    rows, cols = (int(s) for s in shape)
    if cols < 1:
        raise SparseftError(f"{name}: a ({rows}, {cols}) weight has no input columns to pack")
    # the int8 kernels sum a row's products in 32-bit integers, which 255 * 127 * cols must fit
    if values == "int8" and cols > INT8_MAX_COLUMNS:
        raise SparseftError(
            f"{name}: int8 values take at most {INT8_MAX_COLUMNS} input columns, this weight has {cols}; use bf16"
        )
    nbytes = -(-cols // 8)
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, nbytes):
        raise SparseftError(
            f"{name}: bitmask must be uint8 of shape ({rows}, {nbytes}) for a ({rows}, {cols}) weight, "
            f"got {bitmask.dtype} {tuple(bitmask.shape)}; the archive is damaged or from another writer"
        )
    # the kernels read whole words of the mask: a stray bit past the last column would make them read a value
    # (and a column of the activations) that is not there
    if cols % 8 and bool((bitmask[:, -1] >> (cols % 8)).any()):
        raise SparseftError(f"{name}: the bitmask sets bits beyond column {cols}; the archive is damaged")
    if row_offsets.numel() != rows:
        raise SparseftError(
            f"{name}: row_offsets has {row_offsets.numel()} entries for {rows} rows; the archive is damaged"
        )
    counts = _row_counts(bitmask)
    row_start = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(counts, 0)])
    if (
        compressed.dim() != 1
        or compressed.numel() != int(row_start[-1])
        or not torch.equal(row_offsets.long(), row_start[:-1])
    ):
        raise SparseftError(
            f"{name}: {compressed.numel()} packed values and the row offsets do not match the bitmask's "
            f"{int(row_start[-1])} set bits; the archive is damaged"
        )
    words = -(-cols // 64)
    mask = torch.nn.functional.pad(bitmask, (0, words * 8 - nbytes)).contiguous().view(torch.int64)

    rowsum = None
    if values == "int8":
        if compressed.dtype == torch.int8:
            if scale is None or scale.numel() != rows:
                raise SparseftError(
                    f"{name}: int8 values need one scale per output row ({rows}); got {scale}"
                )
            q, scale = compressed, scale.reshape(rows).float().contiguous()  # the kernels read it as an array
        else:
            q, scale = quantize_rows(compressed, row_start)
        # float sums of int8 are exact here (|sum| <= 127 * cols < 2**24) and need no int64 copy per value
        lengths = row_start[1:] - row_start[:-1]
        rowsum = torch.segment_reduce(q.float(), "sum", lengths=lengths).round().int()
        packed_values = _padded(q, torch.int8)
    elif values == "bf16":
        if compressed.dtype == torch.int8:
            if scale is None or scale.numel() != rows:
                raise SparseftError(
                    f"{name}: int8 values need one scale per output row ({rows}); got {scale}"
                )
            compressed = compressed.float() * scale.reshape(rows).float()[_row_ids(row_start)]
            scale = None
        packed_values = _padded(compressed, torch.bfloat16)
    else:
        raise SparseftError(f"values must be 'bf16' or 'int8', got {values!r}")
    return Packed(
        (rows, cols),
        mask,
        packed_values,
        row_start,
        scale if values == "int8" else None,
        rowsum,
        checked=True,
    )


def pack_full_int8(weight: torch.Tensor, block_rows: int = 256) -> Packed:
    """Every entry of a dense (R, C) weight as int8 with per-row scales under an all-ones mask: a dense layer
    (the LM head) for the int8 kernel. Quantized a few rows at a time into one preallocated buffer, so
    packing a 32000-row head needs megabytes of temporaries, not gigabytes."""
    rows, cols = weight.shape
    words = -(-cols // 64)
    bits = torch.zeros(words * 64, dtype=torch.bool)
    bits[:cols] = True
    # bit 63 lands on the sign bit, as it does in the archive's bytes read as int64 words
    mask_row = (bits.reshape(words, 64).long() << torch.arange(64)).sum(1)
    values = torch.zeros(rows * cols + PAD_BYTES, dtype=torch.int8)
    scale = torch.empty(rows)
    rowsum = torch.empty(rows, dtype=torch.int32)
    for r in range(0, rows, block_rows):
        block = weight[r : r + block_rows].detach().reshape(-1)
        n = block.numel() // max(cols, 1)
        q, block_scale = quantize_rows(block, torch.arange(n + 1) * cols)
        scale[r : r + n] = block_scale
        values[r * cols : r * cols + q.numel()] = q
        rowsum[r : r + n] = q.view(n, cols).sum(1, dtype=torch.int32)
    row_start = torch.arange(rows + 1, dtype=torch.int64) * cols
    mask = mask_row.expand(rows, words).contiguous()
    return Packed((rows, cols), mask, values, row_start, scale, rowsum, checked=True)


def concat_rows(parts: list[Packed]) -> Packed:
    """One packed weight holding the rows of `parts` in order (same columns and kind)."""
    cols, kind = parts[0].shape[1], parts[0].kind
    if any(p.shape[1] != cols or p.kind != kind for p in parts):
        raise SparseftError("concat_rows: the parts differ in columns or value kind")
    starts, offset = [], 0
    for p in parts:
        starts.append(p.row_start[:-1] + offset)
        offset += p.nnz
    dtype = parts[0].values.dtype
    pad = torch.zeros(PAD_BYTES // dtype.itemsize, dtype=dtype)
    int8 = kind == "int8"
    return Packed(
        (sum(p.shape[0] for p in parts), cols),
        torch.cat([p.mask for p in parts]),
        torch.cat([*(p.values[: p.nnz] for p in parts), pad]),
        torch.cat([*starts, torch.tensor([offset])]),
        torch.cat([p.scale for p in parts if p.scale is not None]) if int8 else None,
        torch.cat([p.rowsum for p in parts if p.rowsum is not None]) if int8 else None,
        all(p.checked for p in parts),
    )


def pack_dense(
    weight: torch.Tensor, values: Values = "bf16", name: str = "weight", block_rows: int = 2048
) -> Packed:
    """Pack a dense (R, C) weight whose zeros are the pruned entries, `block_rows` rows at a time so the
    temporaries stay small (a 32000-row LM head in one piece would need gigabytes of them)."""
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[1] == 0:
        raise SparseftError(
            f"{name}: expected a 2-D floating-point weight with input columns, got {weight.dtype} "
            f"{tuple(weight.shape)}"
        )
    if weight.device.type != "cpu":
        raise SparseftError(
            f"{name}: the CPU runtime packs CPU weights; move the model to the CPU first (.cpu())"
        )
    blocks = []
    for r in range(0, max(weight.shape[0], 1), block_rows):
        parts = bitmask_of(weight[r : r + block_rows].detach())
        blocks.append(
            pack_bitmask(
                parts["shape"], parts["compressed"], parts["bitmask"], parts["row_offsets"], values, name=name
            )
        )
    return blocks[0] if len(blocks) == 1 else concat_rows(blocks)
