"""Triton kernels for y = x W^T with W in the tile packing of `triton_pack` (GPU decode, batch 1..16).

Decoding a token reads every weight once, so time follows bytes: the kernels read the
compressed tiles (mask words + nonzeros) and expand them in registers, never a dense W. One program owns
`row_tiles` x 16 output rows and walks a range of 64-column tiles; several programs split the columns when there
are too few row blocks to fill the GPU, and their float32 partial sums are added afterwards.

Expanding a tile: the value of the set bit at (row i, column j) of tile t sits at
tile_offsets[t] + (set bits in rows < i) + (set bits before column j in row i).
- Batch 1..7 (`_sparse_gemv_kernel`): one element per mask byte (8 columns); a prefix sum of byte popcounts
  gives each byte's first value, then 8 unrolled steps walk its bits with a predicated load and a float32
  multiply-add each, advancing the position by the bit. No per-column popcount or word selection.
- Batch 8..16 (`_sparse_dot_kernel`): `_decode_tiles` expands each tile to a dense block (a column's position
  from `popc` of its word below it) and feeds `tl.dot` (tensor cores, the batch padded to 16, fp32 accumulation);
  int8/fp8 values convert exactly to bf16 for the dot.
- Over 16 rows of x (prefill): `unpack_dense` expands W with the same decoder and cuBLAS multiplies; there the
  matmul, not the weight bytes, is the cost.
Per-row scales of int8/fp8 values multiply the finished sums. Triton's interpreter has no `popc`: on CPU tensors
the counts come from bit sums and prefix sums instead (same arithmetic; the tests run both under
TRITON_INTERPRET=1, popc emulated).

Everything here runs without host synchronisation, so the decode step can be captured in a CUDA graph
(see docs/GPU.md).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparseft.errors import SparseftError
from sparseft.runtime.triton_pack import TritonPacked, pack_from_runtime

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError as e:  # the CPU runtime never imports this module; a CUDA input does
    raise SparseftError("sparse GPU kernels need Triton: pip install 'sparseft[gpu]'") from e

if TYPE_CHECKING:
    from sparseft.runtime.packing import Packed

MAX_SPARSE_BATCH = 16  # larger batches (prefill) take the dense path


@dataclass(frozen=True)
class LaunchConfig:
    """How the sparse kernels are launched. Calls without one use `default_config`; the benchmark sweeps them."""

    row_tiles: int = 1  # 16-row tiles per program (power of two)
    split: int = 0  # programs sharing one row block's columns; 0 = enough to fill the GPU
    num_warps: int = 4
    dot_min_batch: int = 8  # from this batch on, use tl.dot


@triton.jit
def _decode_tiles(
    masks_ptr,
    offsets_ptr,
    values_ptr,
    tr0,
    tc,
    n_tr,
    n_tc,
    RT: tl.constexpr,
    USE_POPC: tl.constexpr,
    FP8: tl.constexpr,
):
    """Row tiles tr0 .. tr0+RT-1 of column tile tc, expanded to a dense [RT * 16, 64] block of stored values.

    fp8 values arrive as uint8 and are reinterpreted after the load: the interpreter cannot fill masked fp8
    lanes with zero.
    """
    tiles_r = tr0 + tl.arange(0, RT)
    tile_ok = tiles_r < n_tr
    t = tiles_r * n_tc + tc
    rows = tl.arange(0, 16)
    cols = tl.arange(0, 64)
    word_ptr = masks_ptr + t[:, None] * 32 + rows[None, :] * 2  # [RT, 16]: tile t, row i, word 0
    w0 = tl.load(word_ptr, mask=tile_ok[:, None], other=0).to(tl.uint32, bitcast=True)
    w1 = tl.load(word_ptr + 1, mask=tile_ok[:, None], other=0).to(tl.uint32, bitcast=True)
    high = (cols >= 32)[None, None, :]
    word = tl.where(high, w1[:, :, None], w0[:, :, None])  # [RT, 16, 64]: the word holding each column
    shift = (cols % 32).to(tl.uint32)[None, None, :]
    bit = ((word >> shift) & 1).to(tl.int32)
    if USE_POPC:  # libdevice's popc takes int32
        below = (word & ((tl.full(shift.shape, 1, tl.uint32) << shift) - 1)).to(tl.int32, bitcast=True)
        count0 = libdevice.popc(w0.to(tl.int32, bitcast=True))
        in_row = libdevice.popc(below) + tl.where(high, count0[:, :, None], 0)
        row_count = count0 + libdevice.popc(w1.to(tl.int32, bitcast=True))
    else:
        in_row = tl.cumsum(bit, axis=2) - bit
        row_count = tl.sum(bit, axis=2)
    row_start = tl.cumsum(row_count, axis=1) - row_count  # [RT, 16]
    base = tl.load(offsets_ptr + t, mask=tile_ok, other=0)
    pos = base[:, None, None] + row_start[:, :, None] + in_row
    vals = tl.load(values_ptr + pos, mask=bit != 0, other=0)
    if FP8:
        vals = vals.to(tl.float8e4nv, bitcast=True)
    return tl.reshape(vals, (RT * 16, 64))


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,
    mask_bytes_ptr,
    offsets_ptr,
    values_ptr,
    scale_ptr,
    out_ptr,
    B,
    R,
    C,
    n_tr,
    n_tc,
    tiles_per_split,
    stride_xb,
    stride_split,
    stride_ob,
    RT: tl.constexpr,
    BB: tl.constexpr,
    USE_POPC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8: tl.constexpr,
):
    """Small batches: each mask byte (8 columns of one row) is one element; 8 unrolled steps walk its bits.

    A tile's 128 mask bytes (16 rows x 8) are in row-major order like its values, so the first value of each
    byte is the tile's offset plus a prefix sum of the bytes' bit counts; within a byte the position advances by
    one per set bit. This does one popcount per 8 columns and no per-column popcount or word selection.
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    tc_begin = pid_k * tiles_per_split
    tc_end = tl.minimum(tc_begin + tiles_per_split, n_tc)
    tiles_r = pid_r * RT + tl.arange(0, RT)
    tile_ok = tiles_r < n_tr
    byte_idx = tl.arange(0, 128)  # row byte_idx // 8, columns 8 * (byte_idx % 8) + [0, 8)
    batch = tl.arange(0, BB)
    acc = tl.zeros((RT, 128, BB), dtype=tl.float32)
    for tc in range(tc_begin, tc_end):
        t = tiles_r * n_tc + tc
        mask_byte = tl.load(
            mask_bytes_ptr + t[:, None] * 128 + byte_idx[None, :], mask=tile_ok[:, None], other=0
        )
        mask_byte = mask_byte.to(tl.int32)
        if USE_POPC:
            count = libdevice.popc(mask_byte)
        else:
            count = tl.zeros((RT, 128), dtype=tl.int32)
            for k in tl.static_range(8):
                count += (mask_byte >> k) & 1
        base = tl.load(offsets_ptr + t, mask=tile_ok, other=0)
        value_ptr = values_ptr + (base[:, None] + tl.cumsum(count, axis=1) - count)
        col = tc * 64 + (byte_idx % 8) * 8
        for k in tl.static_range(8):
            is_set = (mask_byte & (1 << k)) != 0
            v = tl.load(value_ptr, mask=is_set, other=0)
            if FP8:
                v = v.to(tl.float8e4nv, bitcast=True)
            c = col + k
            xk = tl.load(
                x_ptr + batch[None, :] * stride_xb + c[:, None],
                mask=(c[:, None] < C) & (batch[None, :] < B),
                other=0,
            )  # [128, BB]
            acc += v.to(tl.float32)[:, :, None] * xk.to(tl.float32)[None, :, :]
            value_ptr += is_set.to(tl.int32)  # the next set bit's value follows this one
    y = tl.sum(tl.reshape(acc, (RT * 16, 8, BB)), axis=1)
    r = pid_r * RT * 16 + tl.arange(0, RT * 16)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + r, mask=r < R, other=0)[:, None]
    out = out_ptr + pid_k * stride_split + batch[None, :] * stride_ob + r[:, None]
    tl.store(out, y, mask=(r[:, None] < R) & (batch[None, :] < B))


@triton.jit
def _sparse_dot_kernel(
    x_ptr,
    masks_ptr,
    offsets_ptr,
    values_ptr,
    scale_ptr,
    out_ptr,
    B,
    R,
    C,
    n_tr,
    n_tc,
    tiles_per_split,
    stride_xb,
    stride_split,
    stride_ob,
    RT: tl.constexpr,
    USE_POPC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Batches 8..16: expand each tile to a dense block in registers and multiply on the tensor cores."""
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    tc_begin = pid_k * tiles_per_split
    tc_end = tl.minimum(tc_begin + tiles_per_split, n_tc)
    cols = tl.arange(0, 64)
    batch = tl.arange(0, 16)
    acc = tl.zeros((RT * 16, 16), dtype=tl.float32)
    for tc in range(tc_begin, tc_end):
        w = _decode_tiles(masks_ptr, offsets_ptr, values_ptr, pid_r * RT, tc, n_tr, n_tc, RT, USE_POPC, FP8)
        c = tc * 64 + cols
        x_mask = (c[:, None] < C) & (batch[None, :] < B)
        xt = tl.load(x_ptr + batch[None, :] * stride_xb + c[:, None], mask=x_mask, other=0)  # [64, 16]
        acc += tl.dot(w.to(xt.dtype), xt, input_precision=DOT_PRECISION)
    r = pid_r * RT * 16 + tl.arange(0, RT * 16)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + r, mask=r < R, other=0)[:, None]
    out = out_ptr + pid_k * stride_split + batch[None, :] * stride_ob + r[:, None]
    tl.store(out, acc, mask=(r[:, None] < R) & (batch[None, :] < B))


@triton.jit
def _unpack_kernel(
    masks_ptr,
    offsets_ptr,
    values_ptr,
    scale_ptr,
    out_ptr,
    R,
    C,
    n_tr,
    n_tc,
    RT: tl.constexpr,
    USE_POPC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    FP8: tl.constexpr,
):
    pid_r = tl.program_id(0)
    tc = tl.program_id(1)
    w = _decode_tiles(masks_ptr, offsets_ptr, values_ptr, pid_r * RT, tc, n_tr, n_tc, RT, USE_POPC, FP8)
    w = w.to(tl.float32)
    r = pid_r * RT * 16 + tl.arange(0, RT * 16)
    c = tc * 64 + tl.arange(0, 64)
    if HAS_SCALE:
        w = w * tl.load(scale_ptr + r, mask=r < R, other=0)[:, None]
    out = out_ptr + r[:, None].to(tl.int64) * C + c[None, :]  # R * C may pass 2**31 (vocabulary-sized W)
    tl.store(out, w, mask=(r[:, None] < R) & (c[None, :] < C))


def triton_sparse_linear(
    x: torch.Tensor,
    packed: TritonPacked,
    bias: torch.Tensor | None = None,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) for x of shape (..., C): the sparse kernel up to 16 rows of x, else dense cuBLAS."""
    rows, cols = packed.shape
    if x.shape[-1] != cols or x.device != packed.device or not x.dtype.is_floating_point:
        raise SparseftError(
            f"x is {x.dtype} {tuple(x.shape)} on {x.device}; the sparse weight wants floating x of shape "
            f"(..., {cols}) on {packed.device}"
        )
    x2 = x.reshape(-1, cols)
    bias = None if bias is None else bias.to(x.dtype)
    if x2.shape[0] > MAX_SPARSE_BATCH:
        y = F.linear(x2, unpack_dense(packed, x.dtype), bias)
    else:
        y = sparse_matmul(x2, packed, config)
        if bias is not None:
            y = y + bias
    return y.reshape(*x.shape[:-1], rows)


_gpu_packs: dict[int, TritonPacked] = {}


def runtime_linear(x: torch.Tensor, p: Packed, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`SparseLinear`'s CUDA path: its layout is repacked into tiles on first use and kept while it lives.

    The repacking synchronises with the host, so run one forward before capturing a CUDA graph.
    """
    packed = _gpu_packs.get(id(p))
    if packed is None:
        packed = _gpu_packs[id(p)] = pack_from_runtime(p)
        weakref.finalize(p, _gpu_packs.pop, id(p), None)
    return triton_sparse_linear(x, packed, bias)


def sparse_matmul(x: torch.Tensor, packed: TritonPacked, config: LaunchConfig | None = None) -> torch.Tensor:
    """y = x W^T for x of shape (B, C), B <= 16, with the sparse tile kernel; y has x's dtype."""
    batch = x.shape[0]
    if not 1 <= batch <= MAX_SPARSE_BATCH:
        raise SparseftError(f"the sparse kernel takes 1..{MAX_SPARSE_BATCH} rows of x, got {batch}")
    x = x.contiguous()
    rows, cols = packed.shape
    n_tr, n_tc = packed.tile_grid
    config = config or default_config(packed, batch)
    row_blocks = -(-n_tr // config.row_tiles)
    split = config.split or _fill_split(x.device, row_blocks, n_tc)
    tiles_per_split = -(-n_tc // split)
    split = -(-n_tc // tiles_per_split)  # no program without columns
    # One program per (row block, column range). With one column range it writes y directly in x's dtype;
    # otherwise float32 partial sums that are added below.
    partials = torch.empty(
        (split, batch, rows), dtype=x.dtype if split == 1 else torch.float32, device=x.device
    )
    rest = (
        packed.tile_offsets,
        _stored_values(packed),
        packed.scale if packed.scale is not None else packed.values,  # unused pointer when no scale
        partials,
        batch,
        rows,
        cols,
        n_tr,
        n_tc,
        tiles_per_split,
        x.stride(0),
        partials.stride(0),
        partials.stride(1),
    )
    flags = dict(
        RT=config.row_tiles,
        USE_POPC=_use_popc(x.device),
        HAS_SCALE=packed.scale is not None,
        FP8=packed.values.dtype == torch.float8_e4m3fn,
        num_warps=config.num_warps,
    )
    if batch >= config.dot_min_batch:
        precision = "ieee" if x.dtype == torch.float32 else "tf32"
        _sparse_dot_kernel[(row_blocks, split)](x, packed.masks, *rest, DOT_PRECISION=precision, **flags)
    else:
        mask_bytes = packed.masks.view(torch.uint8)
        block_b = triton.next_power_of_2(batch)
        _sparse_gemv_kernel[(row_blocks, split)](x, mask_bytes, *rest, BB=block_b, **flags)
    return partials[0] if split == 1 else partials.sum(0).to(x.dtype)


def unpack_dense(packed: TritonPacked, dtype: torch.dtype, row_tiles: int = 4) -> torch.Tensor:
    """The dense (R, C) weight in `dtype`, scales applied, expanded on the device by the tile decoder."""
    rows, cols = packed.shape
    n_tr, n_tc = packed.tile_grid
    out = torch.empty((rows, cols), dtype=dtype, device=packed.device)
    scale = packed.scale if packed.scale is not None else packed.values
    _unpack_kernel[(-(-n_tr // row_tiles), n_tc)](
        packed.masks,
        packed.tile_offsets,
        _stored_values(packed),
        scale,
        out,
        rows,
        cols,
        n_tr,
        n_tc,
        RT=row_tiles,
        USE_POPC=_use_popc(out.device),
        HAS_SCALE=packed.scale is not None,
        FP8=packed.values.dtype == torch.float8_e4m3fn,
    )
    return out


def _use_popc(device: torch.device) -> bool:
    """popc on the GPU; Triton's interpreter (CPU tensors) has none, so there the counts come from prefix sums."""
    return device.type == "cuda"


def _stored_values(packed: TritonPacked) -> torch.Tensor:
    fp8 = packed.values.dtype == torch.float8_e4m3fn
    return packed.values.view(torch.uint8) if fp8 else packed.values


def default_config(packed: TritonPacked, batch: int) -> LaunchConfig:
    """Launch settings before measuring on a GPU: 64-row blocks (four tiles share each x load) for batches
    under 8, 32-row blocks for tl.dot. `benchmarks/gpu_decode.py --sweep` measures the alternatives."""
    if batch >= LaunchConfig.dot_min_batch:
        return LaunchConfig(row_tiles=2, num_warps=4)
    return LaunchConfig(row_tiles=4, num_warps=4)


def _fill_split(device: torch.device, row_blocks: int, n_tc: int) -> int:
    """Split the columns until there are about 8 programs per streaming multiprocessor (1 on the CPU): a
    4096-row weight has only 64 row blocks of 64 rows, too few to keep an H100/H200's memory system busy."""
    if device.type != "cuda":
        return 1
    target = 8 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(n_tc, -(-target // row_blocks)))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
