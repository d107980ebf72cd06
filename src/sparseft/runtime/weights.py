"""The weights of a checkpoint directory as the runtime keeps them: linears packed (bitmask + bf16, int8 or int4
values), everything else as plain tensors. A bitmask archive's compressed weights go straight from their parts
into the packed layout, never dense; a Hugging Face checkpoint (pruned, zeros kept) is packed one weight at a
time."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft import formats
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.runtime.linear import DenseLinear, SparseLinear
from sparseft.runtime.packing import (
    INT4_GROUP_MULTIPLE,
    PAD_BYTES,
    VALUES,
    Packed,
    Values,
    concat_rows,
    pack_bitmask,
    pack_dense,
    pack_full_int8,
)
from sparseft.runtime.reader import TensorReader


def read_parts(reader: TensorReader, archive: Any, name: str) -> dict[str, Any]:
    """The archive parts of one weight, read into the buffers the runtime keeps (values already padded)."""
    shape = reader.read(archive.part_key(name, "shape"))
    if shape.dtype != torch.int64 or shape.numel() != 2:
        raise SparseftError(
            f"{name}.shape must be int64 [rows, columns]; the archive is damaged, export it again"
        )
    parts: dict[str, Any] = {
        "shape": (int(shape[0]), int(shape[1])),
        "bitmask": reader.read(archive.part_key(name, "bitmask")),
        "row_offsets": reader.read(archive.part_key(name, "row_offsets")),
        "compressed": reader.read(archive.part_key(name, "compressed"), pad_bytes=PAD_BYTES),
    }
    quant = archive.quantization
    if quant is not None:
        parts["scale"] = reader.read(archive.part_key(name, "scale"))
        parts["bits"], parts["group_size"] = int(quant["bits"]), quant.get("group_size")
    return parts


def check_values(values: str, allowed: tuple[str, ...] = VALUES) -> None:
    if values not in allowed:
        raise SparseftError(f"values must be one of {', '.join(allowed)}, got {values!r}")


def default_values(quantization: dict[str, Any] | None) -> Values:
    """The values an archive runs with unless asked otherwise: as stored (bf16 for unquantized archives)."""
    if quantization is None:
        return "bf16"
    if int(quantization["bits"]) == 8:
        return "int8"
    group_size = quantization.get("group_size")
    if group_size is None or group_size % INT4_GROUP_MULTIPLE == 0:
        return "int4"
    warnings.warn(
        f"int4 values with group size {group_size} run as int8 (dequantized, then quantized per row): the int4 "
        f"kernels take group sizes that are multiples of {INT4_GROUP_MULTIPLE}",
        SparseftWarning,
        stacklevel=3,
    )
    return "int8"


def packed_from_parts(parts: dict[str, Any], name: str, values: Values) -> Packed:
    """One weight's archive parts in the runtime's layout."""
    rows, cols = parts["shape"]
    scale = parts.get("scale")
    stored_int4 = values == "int4" and parts.get("bits") == 4
    if stored_int4 or scale is None or (parts["bits"] == 8 and scale.numel() == rows):
        # int4 nibbles as stored: one scale per row (group_size null) is one group as wide as the padded row
        group_size = (parts["group_size"] or -(-cols // 64) * 64) if stored_int4 else None
        return pack_bitmask(
            parts["shape"],
            parts["compressed"],
            parts["bitmask"],
            parts["row_offsets"],
            values,
            scale,
            name,
            group_size,
        )
    # Group-wise or 4-bit values: dequantize this one weight, then pack it in the runtime's layout. (pack_bitmask
    # checks the parts it takes itself; these it does not see.)
    formats.check_parts(name, parts)
    return pack_dense(formats.decompress(parts, torch.float32), values, name)


class CheckpointWeights:
    """Tensors and packed linears by name from a bitmask archive or an HF safetensors checkpoint."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.kind = formats.detect(self.directory)
        if self.kind == "hf-quantized":
            raise SparseftError(
                f"{self.directory} holds compressed-tensors quantized weights, which the runtime reads from a "
                "bitmask archive only: export with --format bitmask"
            )
        self.archive: Any = None
        if self.kind == "bitmask":
            self.archive = formats.read_archive(self.directory)
            self.config: dict[str, Any] = self.archive.config
            weight_map = self.archive.shards.weight_map
            self._compressed = set(self.archive.compressed_names())
            self._plain = set(self.archive.tensor_names())
        else:
            self.config = formats.shards.read_json(self.directory / formats.CONFIG)
            weight_map = formats.Shards(self.directory).weight_map
            self._compressed = set()
            self._plain = set(weight_map)
        self.reader = TensorReader(self.directory, weight_map)

    @property
    def quantization(self) -> dict[str, Any] | None:
        return None if self.archive is None else self.archive.quantization

    def has(self, name: str) -> bool:
        return name in self._compressed or name in self._plain

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor that stays dense; mapped from its file where it needs no conversion (an embedding table's
        rows enter memory only when looked up)."""
        if name not in self._plain:
            raise SparseftError(f"{self.directory} lacks {name}, which the model needs; export it again")
        if self.reader.dtype(name) == dtype:
            return self.reader.map(name)
        return self.reader.read(name).to(dtype)

    def packed(self, name: str, values: Values, shape: tuple[int, int]) -> Packed:
        """Linear weight `name`, which must be `shape`, packed with `values`."""
        if name in self._compressed:
            parts = read_parts(self.reader, self.archive, name)
            found = parts["shape"]
            packed: Packed | None = None
            if tuple(found) == shape:
                packed = packed_from_parts(parts, name, values)
        else:
            dense = self.tensor(name, torch.float32)
            found = tuple(dense.shape)
            packed = pack_dense(dense, values, name) if found == shape else None
        if packed is None:
            raise SparseftError(
                f"{name} is {tuple(found)} in {self.directory} but its config.json makes it {shape}; the "
                "checkpoint was written for a different model: export it again"
            )
        return packed

    def linear(self, name: str, values: Values, shape: tuple[int, int]) -> tuple[Packed, torch.Tensor | None]:
        """Linear `name` ("model.layers.0.mlp.up_proj"): its packed weight and its fp32 bias, if it has one."""
        packed = self.packed(name + ".weight", values, shape)
        if not self.has(name + ".bias"):
            return packed, None
        bias = self.tensor(name + ".bias", torch.float32)
        if bias.numel() != shape[0]:
            raise SparseftError(
                f"{name}.bias has {bias.numel()} entries for {shape[0]} outputs; export it again"
            )
        return packed, bias


def stacked_linear(parts: list[tuple[Packed, torch.Tensor | None]]) -> SparseLinear:
    """One SparseLinear over the rows of `parts` (q/k/v, gate/up: linears that read the same input), a member
    without a bias (Whisper's k_proj) given zeros in the stacked bias."""
    packed = concat_rows([p for p, _ in parts])
    bias = None
    if any(b is not None for _, b in parts):
        bias = torch.cat([b if b is not None else torch.zeros(p.shape[0]) for p, b in parts])
    return SparseLinear(packed, bias)


def lm_head(weight: torch.Tensor, dtype: torch.dtype, head_values: Values | None) -> nn.Module:
    """The LM head over `weight` (vocab, width): int8 rows for the int8 kernel, our bf16 GEMV, or (None, or a
    float32 model) torch's linear."""
    if head_values == "int8":
        return SparseLinear(pack_full_int8(weight))
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return DenseLinear(linear) if head_values == "bf16" and dtype == torch.bfloat16 else linear
