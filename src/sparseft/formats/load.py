"""Any export read back: which format a directory holds (`detect`), its transformers config (`load_config`), and
the dense transformers model (`load_dir`, what `sparseft.load` returns)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.formats.bitmask import FORMAT, is_legacy_bitmask, load_bitmask, read_archive
from sparseft.formats.build import config_from_dict
from sparseft.formats.compressed_tensors import load_hf_quantized
from sparseft.formats.shards import CONFIG, Shards, read_json
from sparseft.hf import load_model, read_config


def detect(directory: str | os.PathLike[str]) -> str:
    """The kind of checkpoint: bitmask (legacy sparse-bitmask too), hf-quantized or hf; else a SparseftError."""
    path = Path(directory)
    if not path.is_dir():
        raise SparseftError(f"{path} is not a directory; pass a directory written by `sparseft export`")
    config = read_json(path / CONFIG)
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
    if is_legacy_bitmask(config):
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
        return load_hf_quantized(path, read_json(path / CONFIG), dtype, trust_remote_code)
    Shards(path).check_headers()  # transformers' own errors for damaged files are far less clear
    config = read_json(path / CONFIG)
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return load_model(str(path), dtype or getattr(torch, str(stored)), trust_remote_code)


def load_config(name_or_path: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a hub id, an HF directory, or a bitmask archive (its `model_config`)."""
    if Path(name_or_path).is_dir() and detect(name_or_path) == "bitmask":
        return config_from_dict(read_archive(name_or_path).config)
    return read_config(name_or_path, trust_remote_code)
