"""The GPU packing of a sparse weight: the bitmask archive regrouped into tiles of 16 rows x 64 columns.

Why tiles: a GPU program decodes a whole tile at once, so everything it needs should lie together. The archive
(the layout in sparseft/formats.py) keeps one row's mask bytes and nonzeros together, and a tile needs 16 rows' worth. Layout
(`TritonPacked`), for a weight of shape (R, C), with n_tr = ceil(R / 16) row tiles and n_tc = ceil(C / 64)
column tiles, tiles numbered t = tr * n_tc + tc:

- `masks`: int32 (n_tr, n_tc, 16, 2). Row r of tile t covers columns 64 * tc + [0, 64); its mask is two 32-bit
  words, column j being bit j % 32 of word j // 32. These are the archive's own bytes: four LSB-first bytes read as
  a little-endian int32 put column j at bit j, so the words are a reshape of the (zero-padded) archive bitmask.
  Two 32-bit words rather than one 64-bit word keep every shift within 32 bits, which Triton's interpreter and
  the GPU both do without surprises.
- `values`: the nonzeros tile after tile (t = 0, 1, ...), row-major inside a tile; `tile_offsets` (int32,
  n_tiles + 1) says where each tile's values start. A kernel finds the value of a set bit as
  tile_offsets[t] + (set bits in earlier rows of the tile) + (set bits before it in its row): no per-row offsets
  are stored, they cost as much as the mask.
- `scale`: float32 (R,) per-output-channel scales when the values are int8 or fp8 (W = scale[:, None] * values),
  else None. The scales multiply the finished dot product, so the inner loop never touches them.

Rows and columns past the end of W have zero mask bits and hold no values. The archive itself never changes;
this packing is internal and is rebuilt at load time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from sparseft.errors import SparseftError

if TYPE_CHECKING:
    from sparseft.runtime.packing import Packed

TILE_ROWS = 16
TILE_COLS = 64
WORDS_PER_ROW = TILE_COLS // 32

FLOAT_VALUES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_VALUES = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # dtype, largest magnitude
VALUE_KINDS = (*FLOAT_VALUES, *QUANT_VALUES)


@dataclass(frozen=True)
class TritonPacked:
    shape: tuple[int, int]
    masks: torch.Tensor
    tile_offsets: torch.Tensor
    values: torch.Tensor
    scale: torch.Tensor | None

    @property
    def tile_grid(self) -> tuple[int, int]:
        return self.masks.shape[0], self.masks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        tensors = [self.masks, self.tile_offsets, self.values] + (
            [self.scale] if self.scale is not None else []
        )
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> TritonPacked:
        scale = None if self.scale is None else self.scale.to(device)
        return replace(
            self,
            masks=self.masks.to(device),
            tile_offsets=self.tile_offsets.to(device),
            values=self.values.to(device),
            scale=scale,
        )


def pack_for_gpu(
    shape: tuple[int, int] | torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    values: str | None = None,
) -> TritonPacked:
    """Regroup one archive weight (the layout in sparseft/formats.py) into the tile layout, on the tensors' device.

    `values` chooses how the nonzeros are stored: None keeps the archive's dtype (int8 archives need `scale`, one
    per output row), "bf16"/"fp16"/"fp32" cast (dequantizing int8), "int8"/"fp8" quantize symmetric per row.
    """
    rows, cols = _check_archive(shape, compressed, bitmask, row_offsets)
    n_tr, n_tc = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    if sys.byteorder != "little":  # the int32 view below reads the archive's bytes as little-endian words
        raise SparseftError("the GPU packing needs a little-endian host")

    padded = torch.zeros(n_tr * TILE_ROWS, n_tc * TILE_COLS // 8, dtype=torch.uint8, device=bitmask.device)
    padded[:rows, : bitmask.shape[1]] = bitmask
    if cols % 8:  # bits past the last column are padding; never let them select a value
        padded[:rows, bitmask.shape[1] - 1] &= (1 << (cols % 8)) - 1
    words = padded.view(torch.int32).reshape(n_tr, TILE_ROWS, n_tc, WORDS_PER_ROW)
    masks = words.permute(0, 2, 1, 3).contiguous()

    bits = _bits_of_bytes(padded)  # (n_tr * 16, n_tc * 64) bool, row-major like the archive
    row_counts = bits.sum(1)[:rows]
    expected = torch.diff(row_offsets.to(row_counts), append=row_counts.new_tensor([compressed.numel()]))
    if row_counts.sum() != compressed.numel() or not torch.equal(row_counts, expected):
        raise SparseftError(
            f"archive weight {rows}x{cols}: bitmask has {int(row_counts.sum())} set bits, row_offsets/compressed "
            f"say {compressed.numel()} in a different split; the archive is corrupt, re-export it"
        )
    if compressed.numel() >= 2**31:
        raise SparseftError(
            f"archive weight {rows}x{cols} has {compressed.numel()} nonzeros; at most 2**31 fit"
        )

    vals, scale = _convert_values(compressed, scale, row_counts, values)

    # Rank of each nonzero in archive (row-major) order, then read out in tile order.
    rank = torch.full(bits.shape, -1, dtype=torch.int32, device=bits.device)
    rank[bits] = torch.arange(compressed.numel(), dtype=torch.int32, device=bits.device)
    tiled_rank = rank.reshape(n_tr, TILE_ROWS, n_tc, TILE_COLS).permute(0, 2, 1, 3)
    order = tiled_rank[tiled_rank >= 0]
    tile_counts = bits.reshape(n_tr, TILE_ROWS, n_tc, TILE_COLS).sum((1, 3)).flatten()
    tile_offsets = torch.zeros(n_tr * n_tc + 1, dtype=torch.int32, device=bits.device)
    tile_offsets[1:] = torch.cumsum(tile_counts, 0)
    return TritonPacked((rows, cols), masks, tile_offsets, vals[order.long()].contiguous(), scale)


def pack_dense(weight: torch.Tensor, *, values: str | None = None) -> TritonPacked:
    """Pack a dense (R, C) weight whose zeros are the pruned entries: archive layout first, then tiles."""
    if weight.dim() != 2:
        raise SparseftError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    nonzero = weight != 0
    return pack_for_gpu(
        tuple(weight.shape),  # type: ignore[arg-type]
        weight[nonzero],
        _bytes_of_bits(nonzero),
        torch.cumsum(nonzero.sum(1), 0) - nonzero.sum(1),
        values=values,
    )


def pack_from_runtime(p: Packed) -> TritonPacked:
    """The tile packing of a `SparseLinear`'s CPU layout (`runtime.packing.Packed`), on the device it lives on.

    That layout is the archive padded: mask rows to whole little-endian 64-bit words (whose bytes are the
    archive's bitmask bytes), values with a tail of padding, row offsets with the total appended.
    """
    rows, cols = p.shape
    nnz = int(p.row_start[-1])
    bitmask = p.mask.contiguous().view(torch.uint8)[:, : -(-cols // 8)]
    return pack_for_gpu(p.shape, p.values[:nnz], bitmask, p.row_start[:-1], scale=p.scale)


def unpack_reference(packed: TritonPacked) -> torch.Tensor:
    """The dense float32 weight, decoded with plain torch ops: the reference the kernels are tested against.

    It relies only on the mask words and the tile order of the values, not on `tile_offsets`, so it checks
    the packing independently of the offset arithmetic the kernels use.
    """
    n_tr, n_tc = packed.tile_grid
    shifts = torch.arange(32, device=packed.device, dtype=torch.int32)
    bits = ((packed.masks[..., None] >> shifts) & 1).bool().reshape(n_tr, n_tc, TILE_ROWS, TILE_COLS)
    tiles = torch.zeros(bits.shape, dtype=torch.float32, device=packed.device)
    tiles[bits] = packed.values.float()
    dense = tiles.permute(0, 2, 1, 3).reshape(n_tr * TILE_ROWS, n_tc * TILE_COLS)
    dense = dense[: packed.shape[0], : packed.shape[1]]
    return dense * packed.scale[:, None] if packed.scale is not None else dense


def reference_linear(x: torch.Tensor, packed: TritonPacked) -> torch.Tensor:
    """y = x W^T in float32 from the decoded weight."""
    return x.float() @ unpack_reference(packed).T


def _check_archive(
    shape: tuple[int, int] | torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
) -> tuple[int, int]:
    dims = [int(d) for d in (shape.tolist() if isinstance(shape, torch.Tensor) else shape)]
    if len(dims) != 2 or min(dims) < 1:
        raise SparseftError(f"archive shape {dims} is not a 2-D weight shape; the archive is corrupt")
    rows, cols = dims
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
        raise SparseftError(
            f"bitmask is {bitmask.dtype} {tuple(bitmask.shape)}, expected uint8 ({rows}, {-(-cols // 8)}) for "
            f"shape {rows}x{cols}; the archive is corrupt"
        )
    if compressed.dim() != 1 or row_offsets.shape != (rows,):
        raise SparseftError(
            f"compressed {tuple(compressed.shape)} / row_offsets {tuple(row_offsets.shape)} do not fit a "
            f"{rows}x{cols} weight (expected 1-D values and {rows} offsets); the archive is corrupt"
        )
    if len({t.device for t in (compressed, bitmask, row_offsets)}) != 1:
        raise SparseftError(
            "compressed, bitmask and row_offsets are on different devices; move them together"
        )
    return rows, cols


def _convert_values(
    compressed: torch.Tensor, scale: torch.Tensor | None, row_counts: torch.Tensor, values: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Store the nonzeros as asked: keep, cast, dequantize, or quantize per output row (symmetric, nearest)."""
    if values is not None and values not in VALUE_KINDS:
        raise SparseftError(f"unknown GPU value type {values!r}; use one of {', '.join(VALUE_KINDS)}")
    kinds = {dtype: kind for kind, (dtype, _) in QUANT_VALUES.items()}
    kinds.update({dtype: kind for kind, dtype in FLOAT_VALUES.items()})
    current = kinds.get(compressed.dtype)
    if current is None:
        raise SparseftError(f"GPU kernels take {', '.join(VALUE_KINDS)} values, not {compressed.dtype}")
    quantized = current in QUANT_VALUES
    if quantized != (scale is not None):
        need = "need their per-row scale (pass scale=)" if quantized else "take no scale (drop scale=)"
        raise SparseftError(f"{compressed.dtype} archive values {need}")
    if scale is not None:
        scale = scale.reshape(-1).float()
        if scale.numel() != row_counts.numel():
            raise SparseftError(
                f"scale has {scale.numel()} entries, expected one per output row ({row_counts.numel()}); "
                "the GPU kernels do not take group-wise scales"
            )
    if values is None or values == current:
        return compressed, scale

    row_of = torch.repeat_interleave(torch.arange(row_counts.numel(), device=compressed.device), row_counts)
    real = compressed.float() * scale[row_of] if scale is not None else compressed.float()
    if values in FLOAT_VALUES:
        return real.to(FLOAT_VALUES[values]), None
    dtype, largest = QUANT_VALUES[values]
    amax = torch.zeros(row_counts.numel(), device=real.device).scatter_reduce_(0, row_of, real.abs(), "amax")
    new_scale = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
    scaled = real / new_scale[row_of]
    if dtype == torch.int8:
        scaled = scaled.round().clamp_(-largest, largest)
    return scaled.to(dtype), new_scale


def _bits_of_bytes(packed: torch.Tensor) -> torch.Tensor:
    """(R, B) uint8 LSB-first -> (R, 8B) bool."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    return ((packed[..., None] >> shifts) & 1).bool().reshape(packed.shape[0], -1)


def _bytes_of_bits(mask: torch.Tensor) -> torch.Tensor:
    """(R, C) bool -> (R, ceil(C/8)) uint8, column j in bit j % 8 of byte j // 8 (the archive's bitmask)."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :cols] = mask
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * weights).sum(-1, dtype=torch.uint8)
