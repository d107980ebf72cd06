"""HF checkpoints whose quantized linears use compressed-tensors' layout (what `export --format hf --quantize`
writes, and what vLLM and transformers load), and why vLLM may refuse one.

HF checkpoint with ``--quantize``: the compressed-tensors "pack-quantized" format (what vLLM's W4A16/W8A16 path
reads): ``<module>.weight_packed`` int32 (R, ceil(C·bits/32)) holding q + 2^(bits-1) unsigned, 32/bits values
per word, value i of a word at bits [i·bits, (i+1)·bits); ``<module>.weight_scale`` (R, G);
``<module>.weight_shape`` int64 [R, C]; and ``quantization_config`` with quant_method "compressed-tensors".

Zeros stay in the weights: no sparsity_config is declared (vLLM refuses 2:4 declarations and needs none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.errors import SparseftError
from sparseft.formats.build import empty_model, fill
from sparseft.formats.shards import (
    CONFIG,
    DEFAULT_SHARD_BYTES,
    Shards,
    ShardWriter,
    model_config_dict,
    unique_state,
)
from sparseft.io import write_json
from sparseft.quant.spec import QuantizedWeight, QuantSpec, dequantize


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
    for name, tensor in unique_state(model):
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
    model = empty_model(config, dtype, trust_remote_code)
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
    fill(model, provide, directory)
    return model
