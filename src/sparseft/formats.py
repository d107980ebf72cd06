"""Checkpoint formats: the bitmask archive, HF checkpoints with a compressed-tensors quantization config, and the
reader that turns any of them back into a dense transformers model.

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

HF checkpoint with ``--quantize``: the compressed-tensors "pack-quantized" format (what vLLM's W4A16/W8A16 path
reads): ``<module>.weight_packed`` int32 (R, ceil(C·bits/32)) holding q + 2^(bits-1) unsigned, 32/bits values
per word, value i of a word at bits [i·bits, (i+1)·bits); ``<module>.weight_scale`` (R, G);
``<module>.weight_shape`` int64 [R, C]; and ``quantization_config`` with quant_method "compressed-tensors".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.atomic import write_json
from sparseft.errors import SparseftError
from sparseft.models import Conv1D, find_targets, model_class, weight_matrix
from sparseft.quant import QuantizedWeight, QuantSpec, dequantize

FORMAT = "sparseft-bitmask"
FORMAT_VERSION = 1
CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PARTS = ("shape", "bitmask", "row_offsets", "compressed")
SCALE_SUFFIX = "_scale"
DEFAULT_SHARD_BYTES = 5 * 1024**3
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


def pack_int32(q: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors pack-quantized layout: (R, C) int8 -> (R, ceil(C·bits/32)) int32 (for bits 4 and 8)."""
    per_word = 32 // bits
    unsigned = q.to(torch.int64) + (1 << (bits - 1))
    unsigned = torch.nn.functional.pad(unsigned, (0, (-q.shape[1]) % per_word))
    words = torch.zeros(q.shape[0], unsigned.shape[1] // per_word, dtype=torch.int64)
    for i in range(per_word):
        words |= unsigned[:, i::per_word] << (bits * i)
    # Reinterpret the unsigned 32-bit words as int32, as compressed-tensors stores them.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """The inverse of `pack_int32`: (R, words) int32 -> (R, columns) int8."""
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [(words >> (bits * i)) & ((1 << bits) - 1) for i in range(per_word)]
    unsigned = torch.stack(parts, dim=2).reshape(packed.shape[0], -1)[:, :columns]
    return (unsigned - (1 << (bits - 1))).to(torch.int8)


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


# ---- safetensors shards --------------------------------------------------------------------------------------


class ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes`, named and indexed like transformers shards.

    Tensors are added in groups that always land in the same file; only the current shard is held in memory.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending.update({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        self._pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self._pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self._pending, name))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0], self.directory / SINGLE)
            return
        final = {
            tmp: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, tmp in enumerate(self.files)
        }
        for tmp, name in final.items():
            os.replace(self.directory / tmp, self.directory / name)
        weight_map = {key: final[tmp] for key, tmp in sorted(self.weight_map.items())}
        write_json(self.directory / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})


class Shards:
    """Lazy, validated access to the tensors of a directory of safetensors files (single file or indexed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, Any] = {}
        index = directory / INDEX
        if index.exists():
            data = _read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise SparseftError(f"{index} has no weight_map; the checkpoint is damaged, export it again")
            self.weight_map: dict[str, str] = dict(weight_map)
            for file in sorted(set(self.weight_map.values())):
                if not (directory / file).is_file():
                    raise SparseftError(
                        f"{index} names {file}, which is missing from {directory}; copy it back"
                    )
        elif (directory / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        else:
            raise SparseftError(
                f"{directory} has neither {SINGLE} nor {INDEX}; it is not a safetensors checkpoint"
            )

    def _open(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except Exception as e:  # SafetensorError, OSError: a truncated or corrupted file
                raise SparseftError(
                    f"cannot read {self.directory / file}: {e} (the file is damaged; copy it again)"
                ) from e
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise SparseftError(
                f"tensor {name} is missing from {self.directory}; the checkpoint is incomplete"
            )
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:  # a name in the index but not in the file, or unreadable data
            raise SparseftError(f"cannot read tensor {name} from {self.weight_map[name]}: {e}") from e

    def check_headers(self) -> None:
        """Open every file once, so a truncated or corrupted one is reported before any work starts."""
        for file in sorted(set(self.weight_map.values())):
            self._open(file)

    def file_bytes(self) -> int:
        files = set(self.weight_map.values())
        return sum((self.directory / f).stat().st_size for f in files)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SparseftError(f"{path} is missing; pass a directory written by `sparseft export`") from e
    except (OSError, ValueError) as e:
        raise SparseftError(f"cannot parse {path}: {e}") from e


# ---- the archive reader ------------------------------------------------------------------------------------


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


LEGACY_KEYS = ("quantization_config", "compression_config")


def _is_legacy_bitmask(config: dict[str, Any]) -> bool:
    """A Neural Magic / compressed-tensors checkpoint in the old "sparse-bitmask" format (same tensor layout)."""
    for key in LEGACY_KEYS:
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
    model_config = {k: v for k, v in config.items() if k not in LEGACY_KEYS}
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
    meta = _read_json(directory / CONFIG)
    if isinstance(meta, dict) and "model_type" in meta and _is_legacy_bitmask(meta):
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


# ---- writing -----------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    config: dict[str, Any] = model.config.to_dict()  # type: ignore[union-attr,operator]
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)
    return config


def _unique_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict without the second copy of tied tensors (lm_head tied to the embeddings)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        yield name, tensor


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
    for name, tensor in _unique_state(model):
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


def compressed_tensors_config(spec: QuantSpec, ignore: list[str]) -> dict[str, Any]:
    """A compressed-tensors `quantization_config` for weight-only symmetric int quantization of Linear layers."""
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if spec.group_size is None else "group",
        "group_size": spec.group_size,
        "dynamic": False,
        "actorder": None,
        "block_structure": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


# vLLM loads these sibling linears as one fused layer and refuses a checkpoint that quantizes only some of them
VLLM_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# the group sizes of vLLM's Marlin kernels, its int4 path on most GPUs (channel-wise scales are always taken)
VLLM_GROUP_SIZES = (32, 64, 128)


def vllm_problems(model: nn.Module, quantized: set[str], spec: QuantSpec) -> list[str]:
    """Why a compressed-tensors checkpoint of `model` with the linears `quantized` may not load in vLLM, one line
    each (empty when nothing is known to stop it). The checkpoint is still right for transformers and sparseft."""
    problems = []
    if spec.group_size is not None and spec.group_size not in VLLM_GROUP_SIZES:
        sizes = ", ".join(map(str, VLLM_GROUP_SIZES))
        problems.append(
            f"vLLM's int4 kernels take group sizes {sizes}; --group-size {spec.group_size} may not load"
        )
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for group in VLLM_FUSED_GROUPS:
        split = []  # (parent, the members left unquantized) of each group quantized only in part
        for name in sorted(n for n in names if n.rpartition(".")[2] == group[0]):
            parent = name.rpartition(".")[0]
            present = [g for g in group if f"{parent}.{g}" in names]
            left = [g for g in present if f"{parent}.{g}" not in quantized]
            if 0 < len(left) < len(present):
                split.append((parent, left))
        if split:
            parent, left = split[0]
            problems.append(
                f"vLLM fuses {'/'.join(group)} into one layer and refuses them quantized in part, as in {len(split)} "
                f"layers here (e.g. {parent}: {', '.join(left)} not): quantize all or none of them (--targets/--ignore)"
            )
    return problems


def write_hf_quantized(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    spec: QuantSpec,
    directory: Path,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write `model` as a HF checkpoint whose quantized linears use the compressed-tensors pack-quantized layout.
    Zeros stay in the weights (no sparsity_config: vLLM refuses 2:4 declarations and needs none)."""
    for name in quantized:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise SparseftError(
                f"{name} is a {type(module).__name__}; compressed-tensors quantizes nn.Linear only: "
                "use --format bitmask for this model"
            )
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized]
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in _unique_state(model):
        module_name = name.removesuffix(".weight")
        if name.endswith(".weight") and module_name in quantized:
            q = quantized[module_name]
            writer.add(
                {
                    f"{module_name}.weight_packed": pack_int32(q.q, spec.bits),
                    f"{module_name}.weight_scale": q.scale,
                    f"{module_name}.weight_shape": torch.tensor(list(q.q.shape), dtype=torch.int64),
                }
            )
        else:
            writer.add({name: tensor})
    writer.close()
    config = model_config_dict(model)
    config["quantization_config"] = compressed_tensors_config(spec, ignore)
    write_json(directory / CONFIG, config)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


# ---- reading back into a dense model ----------------------------------------------------------------------


def config_from_dict(config_dict: dict[str, Any]) -> Any:
    """The transformers config of a checkpoint's or archive's config dict (its compression and quantization
    blocks left out: the weights are read by sparseft)."""
    import transformers

    config_dict = {k: v for k, v in config_dict.items() if k not in LEGACY_KEYS}
    model_type = str(config_dict.get("model_type"))
    if model_type not in transformers.CONFIG_MAPPING:
        raise SparseftError(
            f"unknown model_type {model_type!r} in the checkpoint config; sparseft builds only models that "
            "transformers itself defines (not remote code)"
        )
    return transformers.CONFIG_MAPPING[model_type].from_dict(config_dict)


def build_model(
    config_dict: dict[str, Any],
    dtype: torch.dtype,
    trust_remote_code: bool,
    empty: contextlib.AbstractContextManager,
) -> nn.Module:
    """A model of the config dict's architecture (its `architectures` class, else the Auto class of its kind),
    built inside `empty`: the caller's way of skipping weight init or memory, since it fills every tensor."""
    import transformers

    config = config_from_dict(config_dict)
    architectures = config_dict.get("architectures") or []
    arch_class = getattr(transformers, architectures[0], None) if architectures else None
    with empty:
        if arch_class is not None:
            model = arch_class._from_config(config, dtype=dtype)
        else:
            model = model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def _build_model(config_dict: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """An uninitialised model of the config's architecture; the caller fills every tensor."""
    from transformers.initialization import no_init_weights

    model = build_model(config_dict, dtype, trust_remote_code, no_init_weights())
    _keep_in_fp32_(model, dtype)
    return model


def _keep_in_fp32_(model: nn.Module, dtype: torch.dtype) -> None:
    """Upcast the modules transformers' from_pretrained keeps in fp32 at this dtype (T5's feed-forward `wo` in an
    fp16 model, whose activations overflow fp16), which building from a config does not."""
    names = (
        set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) if dtype != torch.float32 else set()
    )
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, module in model.named_modules():
        if names & set(name.split(".")):
            module.float()


def _fill(model: nn.Module, provide: dict[str, Any], directory: Path) -> None:
    """Copy tensors into `model` one by one: `provide[name]()` returns the tensor for state-dict key `name`."""
    model.tie_weights()  # type: ignore[operator]
    state = model.state_dict()
    filled: set[int] = set()
    with torch.no_grad():
        for name, target in state.items():
            if name not in provide:
                continue
            value = provide[name]()
            if tuple(value.shape) != tuple(target.shape):
                raise SparseftError(
                    f"tensor {name} in {directory} has shape {tuple(value.shape)}, the model needs {tuple(target.shape)}"
                )
            target.copy_(value)
            filled.add(target.data_ptr())
    missing = [name for name, t in state.items() if name not in provide and t.data_ptr() not in filled]
    if missing:
        raise SparseftError(f"{directory} lacks {len(missing)} tensors the model needs, e.g. {missing[0]}")


def load_bitmask(
    archive: Archive, dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    dtype = dtype or archive.dtype
    model = _build_model(archive.config, dtype, trust_remote_code)
    transposed = archive.transposed
    provide: dict[str, Any] = {name: (lambda n=name: archive.tensor(n)) for name in archive.tensor_names()}
    for name in archive.compressed_names():
        provide[name] = lambda n=name: archive.dense(n).t() if n in transposed else archive.dense(n)
    _fill(model, provide, archive.path)
    return model


def load_hf_quantized(
    directory: Path, config: dict[str, Any], dtype: torch.dtype | None, trust_remote_code: bool
) -> nn.Module:
    """Dequantize a compressed-tensors pack-quantized checkpoint (int weights, symmetric) into a dense model."""
    qc = config["quantization_config"]
    if qc.get("format") != "pack-quantized" or len(qc.get("config_groups", {})) != 1:
        raise SparseftError(
            f"{directory} uses compressed-tensors format {qc.get('format')!r}; sparseft reads its own pack-quantized "
            "exports only (load it with transformers and compressed-tensors instead)"
        )
    weights = next(iter(qc["config_groups"].values()))["weights"]
    if not weights.get("symmetric", True) or weights.get("type") != "int":
        raise SparseftError(
            f"{directory} uses asymmetric or non-int quantization, which sparseft does not read"
        )
    # what sparseft's own exports never hold: a weight read as if it had none would come out wrong
    if weights.get("strategy") not in ("channel", "group") or weights.get("actorder") not in (None, False):
        raise SparseftError(
            f"{directory} quantizes with strategy {weights.get('strategy')!r} and actorder "
            f"{weights.get('actorder')!r}; sparseft reads channel or group scales without activation order "
            "(load it with transformers and compressed-tensors instead)"
        )
    spec = QuantSpec(
        int(weights["num_bits"]), weights.get("group_size") if weights.get("strategy") == "group" else None
    )
    dtype = dtype or getattr(torch, str(config.get("dtype") or config.get("torch_dtype") or "float32"))
    model = _build_model(config, dtype, trust_remote_code)
    shards = Shards(directory)

    def dense(module: str) -> torch.Tensor:
        rows, columns = (int(v) for v in shards.get(f"{module}.weight_shape"))
        q = unpack_int32(shards.get(f"{module}.weight_packed"), spec.bits, columns)
        return dequantize(q, shards.get(f"{module}.weight_scale"), spec, dtype)

    provide: dict[str, Any] = {}
    for key in shards:
        if key.endswith((".weight_g_idx", ".weight_zero_point")):
            raise SparseftError(
                f"{directory} holds {key}, which sparseft does not read (activation order or zero points); "
                "load it with transformers and compressed-tensors instead"
            )
        if key.endswith(".weight_packed"):
            module = key.removesuffix(".weight_packed")
            provide[f"{module}.weight"] = lambda m=module: dense(m)
        elif not key.endswith((".weight_shape", ".weight_scale")):
            provide[key] = lambda k=key: shards.get(k)
    _fill(model, provide, directory)
    return model


def detect(directory: str | os.PathLike[str]) -> str:
    """The kind of checkpoint: bitmask (legacy sparse-bitmask too), hf-quantized or hf; else a SparseftError."""
    path = Path(directory)
    if not path.is_dir():
        raise SparseftError(f"{path} is not a directory; pass a directory written by `sparseft export`")
    config = _read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise SparseftError(f"{path / CONFIG} is not a JSON object")
    if "format" in config and "model_type" not in config:
        if config["format"] != FORMAT:
            raise SparseftError(
                f"{path} has unknown format {config['format']!r}; sparseft reads {FORMAT!r} and HF checkpoints"
            )
        return "bitmask"
    if "model_type" not in config:
        raise SparseftError(
            f"{path / CONFIG} names neither a format nor a model_type; it is not a checkpoint sparseft reads"
        )
    if _is_legacy_bitmask(config):
        return "bitmask"
    qc = config.get("quantization_config")
    # a compressed-tensors config with no quantization groups only describes the sparsity of dense weights
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" and qc.get("config_groups"):
        return "hf-quantized"
    return "hf"


def load_dir(
    directory: str | os.PathLike[str], dtype: torch.dtype | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Any export (bitmask archive, HF, HF + compressed-tensors) as a dense transformers model."""
    path = Path(directory)
    kind = detect(path)
    if kind == "bitmask":
        return load_bitmask(read_archive(path), dtype, trust_remote_code)
    if kind == "hf-quantized":
        return load_hf_quantized(path, _read_json(path / CONFIG), dtype, trust_remote_code)
    from sparseft.models import load_model

    Shards(path).check_headers()  # transformers' own errors for damaged files are far less clear
    config = _read_json(path / CONFIG)
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return load_model(str(path), dtype or getattr(torch, str(stored)), trust_remote_code)


# ---- description -------------------------------------------------------------------------------------------


def _dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits


def describe(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Format, per-layer sparsity and bits, size on disk and bytes per weight of an export (reads one tensor at
    a time). "Theoretical" bytes per weight is what the layer's tensors hold divided by its weight count."""
    path = Path(directory)
    kind = detect(path)
    layers: dict[str, dict[str, Any]] = {}
    other_bytes = 0
    if kind == "bitmask":
        archive = read_archive(path)
        shards = archive.shards
        quant = archive.quantization
        for name in archive.compressed_names():
            parts = archive.compressed(name)
            rows, columns = parts["shape"]
            stored = int(unpack_bitmask(parts["bitmask"], columns).sum())
            nbytes = sum(
                t.numel() * t.element_size() for k, t in parts.items() if isinstance(t, torch.Tensor)
            )
            nbytes += 16  # the shape tensor
            bits = quant["bits"] if quant else _dtype_bits(archive.dtype)
            layers[name] = _layer_entry(rows, columns, 1 - stored / (rows * columns), bits, nbytes)
        for name in archive.tensor_names():
            t = archive.tensor(name)
            other_bytes += t.numel() * t.element_size()
    else:
        shards = Shards(path)
        config = _read_json(path / CONFIG)
        qc = config.get("quantization_config") if kind == "hf-quantized" else None
        bits_q = int(next(iter(qc["config_groups"].values()))["weights"]["num_bits"]) if qc else None
        targets = {f"{name}.weight" for name in _default_targets(config)}
        for key in shards:
            t = shards.get(key)
            nbytes = t.numel() * t.element_size()
            if key.endswith(".weight_packed"):
                module = key.removesuffix(".weight_packed")
                rows, columns = (int(v) for v in shards.get(f"{module}.weight_shape"))
                q = unpack_int32(t, bits_q or 8, columns)
                scale = shards.get(f"{module}.weight_scale")
                nbytes += scale.numel() * scale.element_size() + 16
                layers[f"{module}.weight"] = _layer_entry(
                    rows, columns, float((q == 0).double().mean()), bits_q, nbytes
                )
            elif key.endswith((".weight_scale", ".weight_shape")):
                continue
            elif key in targets and t.ndim == 2:
                rows, columns = t.shape
                layers[key] = _layer_entry(
                    rows, columns, float((t == 0).double().mean()), _dtype_bits(t.dtype), nbytes
                )
            else:
                other_bytes += nbytes
    weights = sum(v["rows"] * v["columns"] for v in layers.values())
    layer_bytes = sum(v["bytes"] for v in layers.values())
    zeros = sum(v["sparsity"] * v["rows"] * v["columns"] for v in layers.values())
    return {
        "path": str(path),
        "format": kind,
        "size_on_disk": shards.file_bytes(),
        "layers_bytes": layer_bytes,
        "other_bytes": other_bytes,
        "layers_sparsity": zeros / weights if weights else 0.0,
        "layers_bytes_per_weight": layer_bytes / weights if weights else 0.0,
        "layers": layers,
    }


def _default_targets(config: dict[str, Any]) -> list[str]:
    """The linears `sparseft prune` targets by default, found on a weightless (meta) copy of the model."""
    import transformers

    config = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = str(config.get("model_type"))
    if model_type not in transformers.CONFIG_MAPPING:
        return []
    model_config = transformers.CONFIG_MAPPING[model_type].from_dict(config)
    with torch.device("meta"):
        model = model_class(model_config).from_config(model_config)
    try:
        return list(find_targets(model))
    except SparseftError:
        return []


def _layer_entry(rows: int, columns: int, sparsity: float, bits: int | None, nbytes: int) -> dict[str, Any]:
    return {
        "rows": rows,
        "columns": columns,
        "sparsity": round(sparsity, 6),
        "bits": bits,
        "bytes": nbytes,
        "bytes_per_weight": round(nbytes / (rows * columns), 6),
    }
