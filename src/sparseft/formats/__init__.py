"""Checkpoint formats: what `sparseft export` writes and `sparseft.load` reads back.

- `bitmask`: the compact archive (bitmask + nonzero values, optionally int8/int4), its reader and writer;
- `compressed_tensors`: HF checkpoints with compressed-tensors int8/int4 weights (vLLM, transformers);
- `shards`: the safetensors files of a checkpoint directory, written in shards and read lazily;
- `build`: an empty transformers model of a checkpoint's config, filled tensor by tensor;
- `load`: which format a directory holds, its config, and the dense model of any export;
- `describe`: per-layer sparsity, bits and bytes of an export (`sparseft info`).

The names below are importable from `sparseft.formats` itself, as they were when it was one module.
"""

from sparseft.formats.bitmask import (
    FORMAT,
    FORMAT_VERSION,
    PARTS,
    Archive,
    check_parts,
    compress,
    decompress,
    pack_bitmask,
    read_archive,
    unpack_bitmask,
    write_bitmask,
)
from sparseft.formats.build import build_model, config_from_dict
from sparseft.formats.compressed_tensors import (
    compressed_tensors_config,
    pack_int32,
    unpack_int32,
    vllm_problems,
    write_hf_quantized,
)
from sparseft.formats.describe import describe
from sparseft.formats.load import detect, load_config, load_dir
from sparseft.formats.shards import CONFIG, Shards, ShardWriter

__all__ = [
    "CONFIG",
    "FORMAT",
    "FORMAT_VERSION",
    "PARTS",
    "Archive",
    "ShardWriter",
    "Shards",
    "build_model",
    "check_parts",
    "compress",
    "compressed_tensors_config",
    "config_from_dict",
    "decompress",
    "describe",
    "detect",
    "load_config",
    "load_dir",
    "pack_bitmask",
    "pack_int32",
    "read_archive",
    "unpack_bitmask",
    "unpack_int32",
    "vllm_problems",
    "write_bitmask",
    "write_hf_quantized",
]
