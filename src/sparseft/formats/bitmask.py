"""The bitmask archive: a pruned model's target weights stored as a bitmask and their nonzero values.

Bitmask archive (a directory)
-----------------------------
``config.json``::

    {"format": "sparseft-bitmask", "format_version": 1, "dtype": "bfloat16",
     "quantization": null | {"bits": 8 | 4, "group_size": null | 128, "strategy": "channel" | "group",
                             "symmetric": true, "method": "rtn" | "gptq"},
     "transposed": [names of weights stored as the transpose of their parameter (GPT-2 Conv1D)],
     "model_config": {the model's Hugging Face config, architectures included}}

It has no ``model_type`` on purpose: transformers refuses the directory instead of loading random weights.
Weights live in safetensors files named like transformers shards: ``model.safetensors``, or
``model-00001-of-0000N.safetensors`` with ``model.safetensors.index.json`` ({"metadata": {"total_size": bytes},
"weight_map": {tensor name: file}}); the tensors of one compressed weight always share a file.

Each compressed weight P (P = "<module>.weight", stored as the (R, C) = (out_features, in_features) matrix) is:

- ``P.shape``        int64 [R, C]
- ``P.bitmask``      uint8 (R, ceil(C/8)); column j of row r is bit j % 8 (least significant first) of byte
  [r, j // 8]; padding bits are 0. A weight is stored when its bit pattern is not all zeros (so -0.0 survives).
- ``P.row_offsets``  int64 (R,): how many stored values precede row r.
- ``P.compressed``   the stored values in row-major order:
  unquantized: the original dtype, one element per set bit;
  int8: int8, one per set bit;
  int4: uint8, two per byte: value k is the low nibble (k even) or high nibble (k odd) of byte k // 2, as a
  4-bit two's complement integer; an odd count leaves the last high nibble 0.
- ``<module>.weight_scale`` (quantized only): (R, G) in the archive dtype, G = 1 (int8, per output channel) or
  ceil(C / group_size) (int4); value at column j of row r is q · scale[r, j // group_size]. In a quantized
  archive the bitmask marks the nonzero integers (a kept weight that rounds to 0 is not stored).

Every other tensor of the state dict (embeddings, norms, biases, lm_head) passes through unchanged under its name;
weights tied to another tensor (lm_head to the embeddings) are stored once.

`read_archive(dir)` opens an archive without building a model (`.config`, `.quantization`, `.compressed_names()`,
`.compressed(name)`, `.dense(name)`, `.tensor_names()`, `.tensor(name)`); it also reads legacy compressed-tensors
"sparse-bitmask" checkpoints (an HF config.json whose sparsity_config has that format), which share the layout.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.formats.build import COMPRESSION_KEYS, empty_model, fill
from sparseft.formats.shards import (
    CONFIG,
    DEFAULT_SHARD_BYTES,
    Shards,
    ShardWriter,
    model_config_dict,
    read_json,
    unique_state,
)
from sparseft.hf import Conv1D, weight_matrix
from sparseft.io import write_json
from sparseft.quant.spec import QuantizedWeight, QuantSpec, dequantize

FORMAT = "sparseft-bitmask"
FORMAT_VERSION = 1
PARTS = ("shape", "bitmask", "row_offsets", "compressed")
SCALE_SUFFIX = "_scale"
INT_DTYPES = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_BITS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([bin(byte).count("1") for byte in range(256)], dtype=torch.int64)


# ---- bit packing -------------------------------------------------------------------------------------------


def stored_mask(weight: torch.Tensor) -> torch.Tensor:
    """True where a weight is stored: its bits are not all zero (so -0.0 is kept and round trips exactly)."""
    as_int = INT_DTYPES.get(weight.dtype)
    return weight.view(as_int) != 0 if as_int is not None else weight != 0


def pack_bitmask(mask: torch.Tensor) -> torch.Tensor:
    """(R, C) bool -> (R, ceil(C/8)) uint8, column j at bit j % 8 of byte j // 8 (least significant first)."""
    rows, columns = mask.shape
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-columns) % 8)).view(rows, -1, 8)
    return (bits << _BITS.to(mask.device)).sum(dim=2, dtype=torch.uint8)


def unpack_bitmask(bitmask: torch.Tensor, columns: int) -> torch.Tensor:
    """(R, ceil(C/8)) uint8 -> (R, C) bool; the inverse of `pack_bitmask`."""
    bits = (bitmask.unsqueeze(2) >> _BITS.to(bitmask.device)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :columns].bool()


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte, value 2k in the low nibble and 2k+1 in the high one."""
    v = values.reshape(-1).to(torch.int16) & 0xF
    v = torch.nn.functional.pad(v, (0, v.numel() % 2))
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """uint8 (ceil(count/2),) -> int8 (count,), sign-extending each 4-bit two's complement value."""
    x = packed.to(torch.int16)
    both = torch.stack([x & 0xF, x >> 4], dim=1).reshape(-1)[:count]
    return (both - ((both & 8) << 1)).to(torch.int8)


# ---- one compressed weight -----------------------------------------------------------------------------------


def compress(matrix: torch.Tensor, quantized: QuantizedWeight | None = None) -> dict[str, torch.Tensor]:
    """The archive parts of one (R, C) weight, keyed by suffix ("shape", "bitmask", ..., and "scale").
    Quantized, the bitmask marks the nonzero integers, so a kept weight that rounds to 0 is dropped too."""
    mask = stored_mask(matrix) if quantized is None else quantized.q != 0
    counts = mask.sum(dim=1)
    parts = {
        "shape": torch.tensor(list(matrix.shape), dtype=torch.int64),
        "bitmask": pack_bitmask(mask),
        "row_offsets": (torch.cumsum(counts, 0) - counts).to(torch.int64),
    }
    if quantized is None:
        parts["compressed"] = matrix[mask].contiguous()
    else:
        values = quantized.q[mask]
        parts["compressed"] = pack_nibbles(values) if quantized.spec.bits == 4 else values.contiguous()
        parts["scale"] = quantized.scale.contiguous()
    return parts


def decompress(parts: dict[str, Any], dtype: torch.dtype) -> torch.Tensor:
    """The dense (R, C) matrix from the parts `Archive.compressed` returns, dequantized when quantized."""
    rows, columns = parts["shape"]
    mask = unpack_bitmask(parts["bitmask"], columns)
    values = parts["compressed"]
    if "scale" not in parts:
        return torch.zeros(rows, columns, dtype=values.dtype).masked_scatter_(mask, values).to(dtype)
    count = int(mask.sum())
    ints = unpack_nibbles(values, count) if parts["bits"] == 4 else values
    q = torch.zeros(rows, columns, dtype=torch.int8).masked_scatter_(mask, ints)
    return dequantize(q, parts["scale"], QuantSpec(parts["bits"], parts["group_size"]), dtype)


# ---- reading -----------------------------------------------------------------------------------------------


@dataclass
class Archive:
    """A bitmask archive opened for reading. Nothing is read until asked for, one weight at a time.

    `config` is the model's Hugging Face config dict; `meta` is the whole archive config.json.
    """

    path: Path
    meta: dict[str, Any]
    shards: Shards
    # compressed weight name -> the prefix of its parts in the files: the name itself, or (current
    # compressed-tensors checkpoints) the module's name without ".weight"
    _compressed: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.meta["model_config"])

    @property
    def quantization(self) -> dict[str, Any] | None:
        return self.meta.get("quantization")

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.meta["dtype"])

    @property
    def transposed(self) -> set[str]:
        return set(self.meta.get("transposed", []))

    def compressed_names(self) -> list[str]:
        """Names P of the compressed weights, e.g. "model.layers.0.mlp.up_proj.weight"."""
        return list(self._compressed)

    def part_key(self, name: str, part: str) -> str:
        """The key of `part` ("shape", "bitmask", "row_offsets", "compressed" or "scale") of weight `name`."""
        prefix = self._compressed[name]
        return prefix + SCALE_SUFFIX if part == "scale" else f"{prefix}.{part}"

    def tensor_names(self) -> list[str]:
        """Names of the tensors that pass through unchanged (embeddings, norms, biases, ...)."""
        own = {self.part_key(name, part) for name in self._compressed for part in (*PARTS, "scale")}
        return [k for k in self.shards if k not in own]

    def tensor(self, name: str) -> torch.Tensor:
        return self.shards.get(name)

    def compressed(self, name: str) -> dict[str, Any]:
        """The parts of weight `name`: 'shape' (R, C) tuple, 'bitmask', 'row_offsets', 'compressed' tensors,
        plus 'scale' tensor, 'bits' and 'group_size' when quantized. Checked against each other."""
        if name not in self._compressed:
            raise SparseftError(f"{name} is not a compressed weight of {self.path}")
        shape = self.shards.get(self.part_key(name, "shape"))
        if shape.dtype != torch.int64 or shape.shape != (2,) or bool((shape < 0).any()):
            raise SparseftError(
                f"{name}.shape in {self.path} must be int64 [rows, columns], got {shape.tolist()}"
            )
        rows, columns = (int(v) for v in shape)
        parts: dict[str, Any] = {"shape": (rows, columns)}
        for part in ("bitmask", "row_offsets", "compressed"):
            parts[part] = self.shards.get(self.part_key(name, part))
        quant = self.quantization
        if quant is not None:
            parts["scale"] = self.shards.get(self.part_key(name, "scale"))
            parts["bits"], parts["group_size"] = int(quant["bits"]), quant.get("group_size")
        check_parts(name, parts)
        return parts

    def dense(self, name: str) -> torch.Tensor:
        """Weight `name` decoded to a dense (R, C) matrix: in the dtype it was stored in, or dequantized to the
        archive dtype."""
        parts = self.compressed(name)
        return decompress(parts, self.dtype if "scale" in parts else parts["compressed"].dtype)


def check_parts(name: str, parts: dict[str, Any]) -> None:
    """Raise a SparseftError unless the parts of one weight agree with each other and with the format."""
    rows, columns = parts["shape"]
    bitmask, offsets, values = parts["bitmask"], parts["row_offsets"], parts["compressed"]

    def bad(what: str) -> SparseftError:
        return SparseftError(
            f"compressed weight {name} is inconsistent: {what}; the archive is damaged, export again"
        )

    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, math.ceil(columns / 8)):
        raise bad(
            f"bitmask is {bitmask.dtype} {tuple(bitmask.shape)}, expected uint8 ({rows}, {math.ceil(columns / 8)})"
        )
    if offsets.dtype != torch.int64 or tuple(offsets.shape) != (rows,):
        raise bad(f"row_offsets is {offsets.dtype} {tuple(offsets.shape)}, expected int64 ({rows},)")
    if columns % 8 and bool((bitmask[:, -1] >> (columns % 8)).any()):
        raise bad(f"the bitmask sets bits beyond column {columns}")
    counts = _POPCOUNT[bitmask.long()].sum(dim=1)  # set bits per row, without unpacking the mask
    if not torch.equal(offsets, torch.cumsum(counts, 0) - counts):
        raise bad("row_offsets do not match the bitmask")
    stored = int(counts.sum())
    # Unquantized values are any float dtype: a model may keep some weights in another dtype than the rest (T5's
    # feed-forward outputs stay fp32 in an fp16 model), and each is stored as it was.
    if "scale" not in parts:
        expected, dtype_ok, needed = stored, values.dtype.is_floating_point, "a float dtype"
    elif parts["bits"] == 4:
        expected, dtype_ok, needed = math.ceil(stored / 2), values.dtype == torch.uint8, "torch.uint8"
    else:
        expected, dtype_ok, needed = stored, values.dtype == torch.int8, "torch.int8"
    if not dtype_ok or tuple(values.shape) != (expected,):
        raise bad(
            f"compressed holds {values.dtype} {tuple(values.shape)}, the bitmask needs {needed} ({expected},)"
        )
    if "scale" in parts:
        groups = QuantSpec(parts["bits"], parts["group_size"]).groups(columns)
        if tuple(parts["scale"].shape) != (rows, groups):
            raise bad(f"weight_scale is {tuple(parts['scale'].shape)}, expected ({rows}, {groups})")


def is_legacy_bitmask(config: dict[str, Any]) -> bool:
    """A Neural Magic / compressed-tensors checkpoint in the old "sparse-bitmask" format (same tensor layout)."""
    for key in COMPRESSION_KEYS:
        sparsity = (
            (config.get(key) or {}).get("sparsity_config") if isinstance(config.get(key), dict) else None
        )
        if isinstance(sparsity, dict) and sparsity.get("format") == "sparse-bitmask":
            if (config.get(key) or {}).get("config_groups"):
                raise SparseftError(
                    "this sparse-bitmask checkpoint is also quantized, which sparseft does not read; "
                    "load it with transformers and compressed-tensors"
                )
            return True
    return False


def _legacy_meta(config: dict[str, Any]) -> dict[str, Any]:
    """The archive config.json a legacy sparse-bitmask checkpoint would have had."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    model_config = {k: v for k, v in config.items() if k not in COMPRESSION_KEYS}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "quantization": None,
        "transposed": [],
        "model_config": model_config,
    }


def read_archive(path: str | os.PathLike[str]) -> Archive:
    """Open a bitmask archive written by `write_bitmask` (or `sparseft export --format bitmask`), or a legacy
    compressed-tensors "sparse-bitmask" checkpoint, whose tensors have the same layout."""
    directory = Path(path)
    meta = read_json(directory / CONFIG)
    if isinstance(meta, dict) and "model_type" in meta and is_legacy_bitmask(meta):
        meta = _legacy_meta(meta)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise SparseftError(
            f"{directory} is not a bitmask archive (config.json format is {found!r}, not {FORMAT!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise SparseftError(
            f"{directory} has bitmask format version {meta.get('format_version')}; this sparseft reads version "
            f"{FORMAT_VERSION}: upgrade sparseft or export again"
        )
    if not isinstance(meta.get("model_config"), dict) or meta.get("dtype") not in (
        "float32",
        "bfloat16",
        "float16",
    ):
        raise SparseftError(f"{directory / CONFIG} lacks model_config or a float dtype; export again")
    quant = meta.get("quantization")
    group_size = quant.get("group_size") if isinstance(quant, dict) else None
    if quant is not None and not (
        isinstance(quant, dict)
        and quant.get("bits") in (4, 8)
        and (group_size is None or (isinstance(group_size, int) and group_size > 0))
    ):
        raise SparseftError(
            f"{directory / CONFIG} has a malformed quantization block {quant!r} (bits 4 or 8, group_size null "
            "or a positive integer); export again"
        )
    shards = Shards(directory)
    prefixes = sorted(k[: -len(".bitmask")] for k in shards if k.endswith(".bitmask"))
    archive = Archive(
        directory, meta, shards, {p if p.endswith(".weight") else p + ".weight": p for p in prefixes}
    )
    for name in archive.compressed_names():
        for part in (*PARTS, "scale") if meta.get("quantization") else PARTS:
            if archive.part_key(name, part) not in shards:
                raise SparseftError(
                    f"{directory} lacks {archive.part_key(name, part)}; the archive is incomplete, export again"
                )
    return archive


def load_bitmask(
    archive: Archive, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    dtype = dtype or archive.dtype
    model = empty_model(archive.config, dtype, trust_remote_code)
    transposed = archive.transposed
    provide: dict[str, Any] = {name: (lambda n=name: archive.tensor(n)) for name in archive.tensor_names()}
    for name in archive.compressed_names():
        provide[name] = lambda n=name: archive.dense(n).t() if n in transposed else archive.dense(n)
    fill(model, provide, archive.path)
    return model


# ---- writing -----------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def write_bitmask(
    model: nn.Module,
    targets: dict[str, nn.Module],
    directory: Path,
    quantized: dict[str, QuantizedWeight] | None = None,
    quant_meta: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write `model` as a bitmask archive into the (empty, temporary) `directory`: targets compressed, the rest
    passed through. `quantized` maps target names to their quantized weights (all targets, or None)."""
    by_weight = {f"{name}.weight": module for name, module in targets.items()}
    writer = ShardWriter(directory, max_shard_bytes)
    transposed = []
    dtype = next(model.parameters()).dtype
    for name, tensor in unique_state(model):
        module = by_weight.get(name)
        if module is None:
            writer.add({name: tensor})
            continue
        matrix = weight_matrix(module)
        if Conv1D is not None and isinstance(module, Conv1D):
            transposed.append(name)
        q = quantized[name[: -len(".weight")]] if quantized is not None else None
        parts = compress(matrix, q)
        scale = parts.pop("scale", None)
        group = {f"{name}.{part}": value for part, value in parts.items()}
        if scale is not None:
            group[name + SCALE_SUFFIX] = scale
        writer.add(group)
    writer.close()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": _dtype_name(dtype),
        "quantization": quant_meta,
        "transposed": transposed,
        "model_config": model_config_dict(model),
    }
    write_json(directory / CONFIG, meta)
