"""What an export holds: its format, per-layer sparsity and bits, size on disk and bytes per weight (`sparseft
info`), read one tensor at a time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from sparseft.errors import SparseftError
from sparseft.formats.bitmask import read_archive, unpack_bitmask
from sparseft.formats.compressed_tensors import unpack_int32
from sparseft.formats.load import detect
from sparseft.formats.shards import CONFIG, Shards, read_json
from sparseft.hf import find_targets, model_class


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
        config = read_json(path / CONFIG)
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
