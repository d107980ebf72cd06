"""The runtime layout is the archive's layout reframed: same bits, same value order, checked on the way in."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from sparseft import formats
from sparseft.errors import SparseftError
from sparseft.quant.spec import QuantSpec, rtn_quantize
from sparseft.runtime import reference
from sparseft.runtime.packing import (
    bitmask_of,
    concat_rows,
    pack_bitmask,
    pack_dense,
    pack_full_int8,
    quantize_rows,
)


@pytest.mark.parametrize("shape", [(1, 1), (3, 8), (9, 63), (17, 130)])
def test_bitmask_matches_the_archive_writer(
    shape: tuple[int, int], awkward_weight: Callable[..., torch.Tensor]
) -> None:
    weight = awkward_weight(*shape)
    ours = bitmask_of(weight)
    theirs = formats.compress(weight)
    for part in ("shape", "bitmask", "row_offsets", "compressed"):
        assert torch.equal(ours[part], theirs[part]), part


@pytest.mark.parametrize("shape", [(1, 1), (5, 31), (9, 64), (17, 130)])
def test_bf16_round_trip(shape: tuple[int, int], awkward_weight: Callable[..., torch.Tensor]) -> None:
    weight = awkward_weight(*shape)
    packed = pack_dense(weight, "bf16")
    assert packed.values.dtype == torch.bfloat16
    assert packed.values.numel() * 2 >= packed.nnz * 2 + 64  # padded for full-vector loads
    assert packed.mask.shape == (shape[0], -(-shape[1] // 64))
    assert torch.equal(reference.unpack(packed), weight.bfloat16().float())
    assert torch.equal(reference.unpack_mask(packed), weight != 0)


def test_int8_per_row_scales(awkward_weight: Callable[..., torch.Tensor]) -> None:
    weight = awkward_weight(12, 90)
    packed = pack_dense(weight, "int8")
    assert packed.scale is not None and packed.rowsum is not None
    torch.testing.assert_close(packed.scale, weight.abs().amax(1) / 127)
    assert packed.scale[0] == 0  # the empty row
    err = (reference.unpack(packed) - weight).abs()
    assert bool((err <= packed.scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(packed.rowsum.long(), reference.unpack(packed, integer=True).sum(1).long())


@pytest.mark.parametrize("values", ["bf16", "int8", "int4"])
def test_packing_in_row_blocks_equals_one_piece(
    values: str, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    weight = awkward_weight(23, 70)
    whole = pack_dense(weight, values, block_rows=1000)  # type: ignore[arg-type]
    blocks = pack_dense(weight, values, block_rows=5)  # type: ignore[arg-type]
    extra = {"int8": ("scale", "rowsum"), "int4": ("scale",)}.get(values, ())
    for part in ("mask", "values", "row_start", *extra):
        assert torch.equal(getattr(blocks, part), getattr(whole, part)), part
    assert blocks.scale is None if values == "bf16" else blocks.scale is not None
    with pytest.raises(SparseftError, match="differ"):
        concat_rows([whole, pack_dense(weight[:, :40], values)])  # type: ignore[arg-type]


@pytest.mark.parametrize("values", ["bf16", "int8", "int4"])
def test_a_row_range_reads_the_same_buffers(values: str, awkward_weight: Callable[..., torch.Tensor]) -> None:
    packed = pack_dense(awkward_weight(20, 70), values)  # type: ignore[arg-type]
    part = packed.rows(5, 12)
    assert part.shape == (7, 70) and part.values.data_ptr() >= packed.values.data_ptr()
    assert torch.equal(reference.unpack(part), reference.unpack(packed)[5:12])
    # the padding is still behind
    assert part.values.numel() * part.values.element_size() >= part.nnz * part.bits_per_weight() / 8 + 64


@pytest.mark.parametrize("cols", [70, 128])
def test_full_int8_packing_keeps_every_entry(cols: int) -> None:
    weight = torch.randn(37, cols)
    weight[3, 5] = 0.0  # a zero is stored too, as a zero value under a set bit
    full = pack_full_int8(weight, block_rows=8)
    assert torch.equal(reference.unpack_mask(full), torch.ones(37, cols, dtype=torch.bool))
    sparse = pack_dense(weight, "int8")
    torch.testing.assert_close(reference.unpack(full), reference.unpack(sparse))
    assert full.scale is not None and full.rowsum is not None and sparse.scale is not None
    assert torch.equal(full.scale, sparse.scale)
    assert torch.equal(full.rowsum.long(), reference.unpack(full, integer=True).sum(1).long())


def test_int8_archive_values_are_used_as_stored(awkward_weight: Callable[..., torch.Tensor]) -> None:
    weight = awkward_weight(6, 40)
    parts = bitmask_of(weight)
    q, scale = quantize_rows(
        parts["compressed"], torch.cat([parts["row_offsets"], torch.tensor([weight.count_nonzero()])])
    )
    packed = pack_bitmask(parts["shape"], q, parts["bitmask"], parts["row_offsets"], "int8", scale[:, None])
    assert torch.equal(packed.values[: packed.nnz], q)
    as_bf16 = pack_bitmask(parts["shape"], q, parts["bitmask"], parts["row_offsets"], "bf16", scale[:, None])
    torch.testing.assert_close(reference.unpack(as_bf16), reference.unpack(packed), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_archive_values_are_used_as_stored(
    group_size: int, awkward_weight: Callable[..., torch.Tensor]
) -> None:
    # what `sparseft export --quantize int4` writes, packed as it is: the same nibbles, the same scales
    weight = awkward_weight(9, 200).bfloat16()
    quantized = rtn_quantize(weight, QuantSpec(4, group_size))
    parts = formats.compress(weight, quantized)
    packed = pack_bitmask(
        parts["shape"],
        parts["compressed"],
        parts["bitmask"],
        parts["row_offsets"],
        "int4",
        parts["scale"],
        group_size=group_size,
    )
    assert packed.kind == "int4" and packed.group_size == group_size
    assert torch.equal(packed.values[: parts["compressed"].numel()], parts["compressed"])
    assert (
        packed.scale is not None and packed.scale.dtype == torch.bfloat16
    )  # a bf16 archive's scales are exact
    assert torch.equal(reference.unpack(packed), quantized.dequantize(torch.float32))
    # quantizing a float weight at packing time gives what the exporter writes
    again = pack_dense(weight.float(), "int4", group_size=group_size)
    assert torch.equal(reference.unpack(again), quantized.dequantize(torch.float32))


def test_int4_needs_fewer_bytes_than_int8(awkward_weight: Callable[..., torch.Tensor]) -> None:
    weight = awkward_weight(256, 2048)
    bits = {v: pack_dense(weight, v).bits_per_weight() for v in ("bf16", "int8", "int4")}  # type: ignore[arg-type]
    # at 70%: values 0.3 x 4 bits, the mask 1 bit, a bf16 scale per 128 columns; int8 0.3 x 8 bits; bf16 0.3 x 16
    assert 2.3 < bits["int4"] < 2.5 < 3.4 < bits["int8"] < 3.5 < 5.8 < bits["bf16"] < 5.9


def test_damaged_parts_are_refused(awkward_weight: Callable[..., torch.Tensor]) -> None:
    parts = bitmask_of(awkward_weight(6, 40))
    shape, values, bitmask, offsets = (
        parts["shape"],
        parts["compressed"],
        parts["bitmask"],
        parts["row_offsets"],
    )
    with pytest.raises(SparseftError, match="bitmask must be uint8"):
        pack_bitmask(shape, values, bitmask[:, :-1], offsets)
    with pytest.raises(SparseftError, match="row_offsets has"):
        pack_bitmask(shape, values, bitmask, offsets[:-1])
    with pytest.raises(SparseftError, match="do not match the bitmask"):
        pack_bitmask(shape, values[:-1], bitmask, offsets)
    with pytest.raises(SparseftError, match="one scale per output row"):
        pack_bitmask(shape, values.to(torch.int8), bitmask, offsets, "int8")
    with pytest.raises(SparseftError, match="values must be"):
        pack_bitmask(shape, values, bitmask, offsets, "fp8")  # type: ignore[arg-type]
    odd = bitmask_of(awkward_weight(6, 37))
    stray = odd["bitmask"].clone()
    stray[0, -1] |= 0x80  # column 39 of 37
    with pytest.raises(SparseftError, match="beyond column 37"):
        pack_bitmask(odd["shape"], odd["compressed"], stray, odd["row_offsets"])
    with pytest.raises(SparseftError, match="2-D floating-point"):
        pack_dense(torch.ones(3, 4, dtype=torch.int32))
    quantized = formats.compress(awkward_weight(6, 40), rtn_quantize(awkward_weight(6, 40), QuantSpec(4, 32)))
    nibbles, scale = quantized["compressed"], quantized["scale"]
    with pytest.raises(SparseftError, match="do not match the bitmask"):
        pack_bitmask(
            shape, nibbles[:-1], quantized["bitmask"], quantized["row_offsets"], "int4", scale, "w", 32
        )
    with pytest.raises(SparseftError, match="scales of shape"):
        pack_bitmask(
            shape, nibbles, quantized["bitmask"], quantized["row_offsets"], "int4", scale[:, :1], "w", 32
        )
    with pytest.raises(SparseftError, match="multiples of 32"):
        pack_bitmask(shape, nibbles, quantized["bitmask"], quantized["row_offsets"], "int4", scale, "w", 40)
    with pytest.raises(SparseftError, match="pack as int4 only"):
        pack_bitmask(shape, nibbles, quantized["bitmask"], quantized["row_offsets"], "bf16", scale)
