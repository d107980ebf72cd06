"""The runtime's internal weight layout, made from the bitmask archive's tensors or from a dense weight.

The archive (the layout in sparseft/formats.py) stores a weight (R, C) as its nonzeros in row-major order, a bitmask of
ceil(C/8) bytes per row (least significant bit first) and the nonzeros before each row. The kernels keep the
same order and only change the framing: each mask row is padded to whole 64-bit words (read as little-endian,
byte b bit i is word b // 8 bit 8 * (b % 8) + i, the same column), the offsets get the total appended, and the
values get 64 zero bytes of tail so full-vector loads never read past the buffer. int8 values carry one fp32
scale per output row and the row sums of the int8 values (for the u8 x s8 zero-point correction). int4 values stay
two to a byte exactly as the archive stores them (offsets count values, so a row may start at a high nibble), with
one scale per group of `group_size` input columns (rows, groups), bf16 where that is exact, else fp32.
This layout is internal and may change; the archive may not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from sparseft.errors import SparseftError
from sparseft.formats.bitmask import pack_nibbles, unpack_nibbles

Values = Literal["bf16", "int8", "int4"]
VALUES: tuple[Values, ...] = ("bf16", "int8", "int4")
PAD_BYTES = 64
# The int4 kernels apply a group's scale per 32 columns at the finest.
INT4_GROUP_MULTIPLE = 32
DEFAULT_INT4_GROUP = 128


@dataclass
class Packed:
    shape: tuple[int, int]
    mask: torch.Tensor  # int64 (rows, words)
    values: torch.Tensor  # bfloat16, int8 or uint8 (int4, two a byte), 1-D, nonzeros + padding
    row_start: torch.Tensor  # int64 (rows + 1), counted in values
    scale: torch.Tensor | None = None  # int8: float32 (rows); int4: bfloat16 or float32 (rows, groups)
    rowsum: torch.Tensor | None = None  # int32 (rows), int8 only
    # made by the packers here, whose offsets agree with the mask; others are checked before the kernels use them
    checked: bool = field(default=False, repr=False, compare=False)
    group_size: int = 0  # int4 only: input columns per scale

    @property
    def kind(self) -> Values:
        if self.values.dtype == torch.uint8:
            return "int4"
        return "int8" if self.values.dtype == torch.int8 else "bf16"

    @property
    def nnz(self) -> int:
        return int(self.row_start[-1] - self.row_start[0])

    def rows(self, start: int, stop: int) -> Packed:
        """Rows [start, stop) over the same buffers (offsets rebased; the values' padding is still behind)."""
        first = int(self.row_start[start])
        # int4: from the byte that holds the first value, which may be its high nibble
        skipped = first - first % 2 if self.kind == "int4" else first
        return Packed(
            (stop - start, self.shape[1]),
            self.mask[start:stop],
            self.values[skipped // 2 if self.kind == "int4" else skipped :],
            self.row_start[start : stop + 1] - skipped,
            None if self.scale is None else self.scale[start:stop],
            None if self.rowsum is None else self.rowsum[start:stop],
            self.checked,
            self.group_size,
        )

    def bits_per_weight(self) -> float:
        """Bits read per weight of the (rows, columns) matrix at decode: mask, values and scales."""
        return 8 * self.nbytes() / max(self.shape[0] * self.shape[1], 1)

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


def check_group_size(group_size: int, name: str = "weight") -> None:
    if group_size < 1 or group_size % INT4_GROUP_MULTIPLE:
        raise SparseftError(
            f"{name}: int4 values run with group sizes that are multiples of {INT4_GROUP_MULTIPLE} (32, 64, 128), "
            f"got {group_size}; load with values='int8' or 'bf16', or export again with --group-size 128"
        )


def _group_scales(scale: torch.Tensor, rows: int, groups: int, name: str) -> torch.Tensor:
    """The archive's (rows, groups) scales as the kernels read them: bf16 where that is exact (a bf16 archive's
    are), else fp32."""
    if tuple(scale.shape) != (rows, groups) or not scale.is_floating_point():
        raise SparseftError(
            f"{name}: int4 values need float scales of shape ({rows}, {groups}), got {scale.dtype} "
            f"{tuple(scale.shape)}; the archive is damaged, export it again"
        )
    exact = scale.to(torch.bfloat16)
    return (exact if torch.equal(exact.float(), scale.float()) else scale.float()).contiguous()


def _value_columns(bitmask: torch.Tensor, cols: int) -> torch.Tensor:
    """The column of each set bit of a (rows, ceil(cols / 8)) bitmask, in row-major order."""
    bits = (bitmask.unsqueeze(2) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :cols].nonzero()[:, 1]


def quantize_groups(
    values: torch.Tensor, row_start: torch.Tensor, columns: torch.Tensor, groups: int, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per group over a row-major packed array, as `sparseft export --quantize int4` does it:
    scale = max|w| / 7 rounded to bf16 before dividing, all-zero groups scale 1, q = round(w / scale) in
    [-8, 7]. Returns q (int8) and the (rows, groups) bf16 scales."""
    rows = len(row_start) - 1
    ids = _row_ids(row_start) * groups + columns // group_size
    v = values.float()
    absmax = torch.zeros(rows * groups).scatter_reduce_(0, ids, v.abs(), "amax")
    scale = (absmax / 7).to(torch.bfloat16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(v / scale.float()[ids]).clamp_(-8, 7).to(torch.int8)
    return q, scale.reshape(rows, groups)


def _pack_int4(
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_start: torch.Tensor,
    cols: int,
    scale: torch.Tensor | None,
    group_size: int | None,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Values, scales and group size of an int4 weight: the archive's nibbles as they are, or float (or int8 with
    per-row scales) values quantized per group of `group_size` columns (default 128)."""
    rows = len(row_start) - 1
    if compressed.dtype == torch.uint8:
        if scale is None or not group_size:
            raise SparseftError(f"{name}: int4 values need their group scales and group size")
        check_group_size(group_size, name)
        return (
            _padded(compressed, torch.uint8),
            _group_scales(scale, rows, -(-cols // group_size), name),
            group_size,
        )
    group_size = group_size or DEFAULT_INT4_GROUP
    check_group_size(group_size, name)
    if compressed.dtype == torch.int8:
        if scale is None or scale.numel() != rows:
            raise SparseftError(f"{name}: int8 values need one scale per output row ({rows}); got {scale}")
        compressed = compressed.float() * scale.reshape(rows).float()[_row_ids(row_start)]
    groups = -(-cols // group_size)
    q, scales = quantize_groups(compressed, row_start, _value_columns(bitmask, cols), groups, group_size)
    return _padded(pack_nibbles(q), torch.uint8), scales, group_size


INT8_MAX_COLUMNS = 65536


def pack_bitmask(
    shape: torch.Tensor | tuple[int, int],
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    values: Values = "bf16",
    scale: torch.Tensor | None = None,
    name: str = "weight",
    group_size: int | None = None,
) -> Packed:
    """Pack the archive's tensors of one weight. `compressed` may be float (converted, or quantized per row
    for int8 or per group of `group_size` columns for int4), int8 with its per-row `scale` (an archive quantized
    per channel), or int4 nibbles (uint8) with their (rows, groups) `scale` and `group_size`, packed as they are."""
    rows, cols = (int(s) for s in shape)
    if cols < 1:
        raise SparseftError(f"{name}: a ({rows}, {cols}) weight has no input columns to pack")
    # the int8 kernels sum a row's products in 32-bit integers, which 255 * 127 * cols must fit
    if values in ("int8", "int4") and cols > INT8_MAX_COLUMNS:
        raise SparseftError(
            f"{name}: {values} values take at most {INT8_MAX_COLUMNS} input columns, this weight has {cols}; "
            "use bf16"
        )
    if compressed.dtype == torch.uint8 and values != "int4":
        raise SparseftError(f"{name}: int4 values (uint8 nibbles) pack as int4 only; dequantize them first")
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
    stored = int(row_start[-1])
    if (
        compressed.dim() != 1
        or compressed.numel() != (-(-stored // 2) if compressed.dtype == torch.uint8 else stored)
        or not torch.equal(row_offsets.long(), row_start[:-1])
    ):
        raise SparseftError(
            f"{name}: {compressed.numel()} packed values and the row offsets do not match the bitmask's "
            f"{stored} set bits; the archive is damaged"
        )
    words = -(-cols // 64)
    mask = torch.nn.functional.pad(bitmask, (0, words * 8 - nbytes)).contiguous().view(torch.int64)

    rowsum = None
    if values == "int4":
        nibbles, scale, group_size = _pack_int4(compressed, bitmask, row_start, cols, scale, group_size, name)
        return Packed(
            (rows, cols), mask, nibbles, row_start, scale, None, checked=True, group_size=group_size
        )
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
        raise SparseftError(f"values must be one of {', '.join(VALUES)}, got {values!r}")
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
    if any(p.shape[1] != cols or p.kind != kind or p.group_size != parts[0].group_size for p in parts):
        raise SparseftError("concat_rows: the parts differ in columns, value kind or group size")
    if kind == "int4":
        return _concat_int4(parts)
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


def _int4_values(p: Packed) -> torch.Tensor:
    """The int4 values of `p` as int8, one per element."""
    start = int(p.row_start[0])
    return unpack_nibbles(p.values[: -(-(start + p.nnz) // 2)], start + p.nnz)[start:]


def _concat_int4(parts: list[Packed]) -> Packed:
    # a part with an odd count would leave the next one starting mid-byte: the nibbles are packed again
    starts, offset = [], 0
    for p in parts:
        starts.append(p.row_start[:-1] - p.row_start[0] + offset)
        offset += p.nnz
    nibbles = pack_nibbles(torch.cat([_int4_values(p) for p in parts]))
    return Packed(
        (sum(p.shape[0] for p in parts), parts[0].shape[1]),
        torch.cat([p.mask for p in parts]),
        torch.cat([nibbles, torch.zeros(PAD_BYTES, dtype=torch.uint8)]),
        torch.cat([*starts, torch.tensor([offset])]),
        torch.cat([p.scale for p in parts if p.scale is not None]),
        None,
        all(p.checked for p in parts),
        parts[0].group_size,
    )


def pack_dense(
    weight: torch.Tensor,
    values: Values = "bf16",
    name: str = "weight",
    block_rows: int = 2048,
    group_size: int | None = None,
) -> Packed:
    """Pack a dense (R, C) weight whose zeros are the pruned entries, `block_rows` rows at a time so the
    temporaries stay small (a 32000-row LM head in one piece would need gigabytes of them). int4 values are
    quantized per group of `group_size` input columns (default 128)."""
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
                parts["shape"],
                parts["compressed"],
                parts["bitmask"],
                parts["row_offsets"],
                values,
                name=name,
                group_size=group_size,
            )
        )
    return blocks[0] if len(blocks) == 1 else concat_rows(blocks)
