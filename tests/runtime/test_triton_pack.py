"""The GPU tile packing: archive in, tiles out, decoded back exactly by the plain-torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparseft.errors import SparseftError
from sparseft.runtime.triton_pack import (
    TILE_COLS,
    TILE_ROWS,
    pack_dense,
    pack_for_gpu,
    pack_from_runtime,
    unpack_reference,
)


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    """Random weight with an empty row, a fully dense row and a dense last column, where shapes allow."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[torch.rand(rows, cols, generator=gen) < sparsity] = 0
    if rows > 2:
        w[1] = 0
        w[2] = torch.randn(cols, generator=gen).abs() + 0.1
    w[:, -1] = torch.randn(rows, generator=gen).abs() + 0.1
    return w


def archive_of(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The bitmask archive (its layout is in sparseft/formats.py), written independently with numpy (LSB-first bytes)."""
    mask = (w != 0).numpy()
    counts = mask.sum(1)
    return {
        "shape": torch.tensor(w.shape, dtype=torch.int64),
        "compressed": w[w != 0],
        "bitmask": torch.from_numpy(np.packbits(mask, axis=1, bitorder="little")),
        "row_offsets": torch.from_numpy(np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)),
    }


def pack_archive(archive: dict[str, torch.Tensor], **kwargs: object) -> object:
    return pack_for_gpu(
        archive["shape"], archive["compressed"], archive["bitmask"], archive["row_offsets"], **kwargs
    )


@pytest.mark.parametrize("shape", [(1, 1), (16, 64), (37, 150), (100, 7), (33, 200), (5, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_archive_round_trip_is_exact(shape: tuple[int, int], dtype: torch.dtype) -> None:
    w = sparse_weight(*shape, sparsity=0.7).to(dtype)
    packed = pack_archive(archive_of(w))
    assert packed.values.dtype == dtype
    assert torch.equal(unpack_reference(packed), w.float())


def test_pack_dense_matches_the_archive_path() -> None:
    w = sparse_weight(45, 300, sparsity=0.6)
    a, b = pack_dense(w), pack_archive(archive_of(w))
    for name in ("masks", "tile_offsets", "values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_layout_tile_offsets_and_bytes() -> None:
    rows, cols = 40, 200
    w = sparse_weight(rows, cols, sparsity=0.7)
    packed = pack_dense(w, values="bf16")
    n_tr, n_tc = -(-rows // TILE_ROWS), -(-cols // TILE_COLS)
    assert packed.masks.shape == (n_tr, n_tc, TILE_ROWS, 2) and packed.masks.dtype == torch.int32
    padded = torch.zeros(n_tr * TILE_ROWS, n_tc * TILE_COLS)
    padded[:rows, :cols] = w
    per_tile = (padded != 0).reshape(n_tr, TILE_ROWS, n_tc, TILE_COLS).sum((1, 3)).flatten()
    assert torch.equal(torch.diff(packed.tile_offsets).long(), per_tile)
    assert int(packed.tile_offsets[0]) == 0 and int(packed.tile_offsets[-1]) == int((w != 0).sum())
    # column j of a tile row is bit j of the 64-bit (two-word) mask: check one set and one clear position
    r, c = int(torch.nonzero(w)[5, 0]), int(torch.nonzero(w)[5, 1])
    word = int(packed.masks[r // 16, c // 64, r % 16, (c % 64) // 32]) & 0xFFFFFFFF
    assert (word >> (c % 32)) & 1 == 1
    nnz = int((w != 0).sum())
    assert packed.nbytes == 2 * nnz + n_tr * n_tc * (TILE_ROWS * 8 + 4) + 4


@pytest.mark.parametrize("kind, dtype, tol", [("int8", torch.int8, 0.5), ("fp8", torch.float8_e4m3fn, 0.07)])
def test_quantized_values_keep_zeros_and_stay_close(kind: str, dtype: torch.dtype, tol: float) -> None:
    w = sparse_weight(33, 150, sparsity=0.7)
    packed = pack_dense(w, values=kind)
    assert packed.values.dtype == dtype and packed.scale is not None and packed.scale.shape == (33,)
    dequant = unpack_reference(packed)
    assert (dequant[w == 0] == 0).all()  # pruned stay pruned (a tiny kept weight may round to zero)
    rows_absmax = w.abs().amax(1, keepdim=True)
    if kind == "int8":  # round to nearest: at most half a step per entry, one step = absmax / 127
        assert ((dequant - w).abs() <= tol * rows_absmax / 127 + 1e-6).all()
    else:  # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 (normal range)
        assert ((dequant - w).abs() <= tol * w.abs() + 1e-3 * rows_absmax).all()


def test_int8_archive_values_are_kept_or_dequantized() -> None:
    w = sparse_weight(20, 70, sparsity=0.5)
    archive = archive_of(w)
    scale = torch.rand(20, 1) + 0.5
    q = torch.randint(1, 127, archive["compressed"].shape, dtype=torch.int8)
    archive["compressed"] = q
    kept = pack_archive(archive, scale=scale)
    assert kept.values.dtype == torch.int8 and torch.equal(kept.scale, scale.flatten())
    as_bf16 = pack_archive(archive, scale=scale, values="fp32")
    assert as_bf16.scale is None
    assert torch.allclose(unpack_reference(as_bf16), unpack_reference(kept))


def test_padding_bits_past_the_last_column_are_ignored() -> None:
    w = sparse_weight(4, 13, sparsity=0.5)
    archive = archive_of(w)
    archive["bitmask"][:, -1] |= 0b1110_0000  # columns 13..15 do not exist
    assert torch.equal(unpack_reference(pack_archive(archive)), w)


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda a: a.update(row_offsets=a["row_offsets"] + 1), "corrupt"),
        (lambda a: a.update(compressed=a["compressed"][:-1]), "set bits"),
        (lambda a: a.update(bitmask=a["bitmask"][:, :-1]), "bitmask"),
        (lambda a: a.update(shape=torch.tensor([8])), "2-D"),
        (lambda a: a.update(compressed=a["compressed"].to(torch.int8)), "scale"),
        (lambda a: a.update(compressed=a["compressed"].to(torch.int32)), "not torch.int32"),
    ],
)
def test_corrupt_archives_raise_one_clear_error(corrupt: object, match: str) -> None:
    archive = archive_of(sparse_weight(8, 30, sparsity=0.5))
    corrupt(archive)  # type: ignore[operator]
    with pytest.raises(SparseftError, match=match):
        pack_archive(archive)


def test_bad_options_raise() -> None:
    archive = archive_of(sparse_weight(8, 30, sparsity=0.5))
    with pytest.raises(SparseftError, match="unknown GPU value type"):
        pack_archive(archive, values="int4")
    with pytest.raises(SparseftError, match="take no scale"):
        pack_archive(archive, scale=torch.ones(8))
    archive["compressed"] = archive["compressed"].to(torch.int8)
    with pytest.raises(SparseftError, match="group-wise"):
        pack_archive(archive, scale=torch.ones(8, 2))


@pytest.mark.parametrize("values", ["bf16", "int8"])
def test_sparse_linear_layout_repacks_exactly(values: str) -> None:
    from sparseft.runtime import packing, reference

    w = sparse_weight(37, 150, sparsity=0.7)
    cpu_layout = packing.pack_dense(w, values, "w")
    packed = pack_from_runtime(cpu_layout)
    assert packed.values.dtype == cpu_layout.values.dtype
    assert torch.equal(unpack_reference(packed), reference.unpack(cpu_layout).float())
