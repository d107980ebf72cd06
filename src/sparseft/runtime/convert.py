"""Swap a model's pruned linears for `SparseLinear`: in place (`sparsify_`) or straight from a bitmask
archive (`load`), without ever holding the dense weights, so peak memory is the compressed size plus the
dense tensors that stay dense (embeddings, norms, LM head) plus activations."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft import formats
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.formats import build_model, read_archive
from sparseft.hf import find_targets, is_linear, replace_module, weight_matrix
from sparseft.runtime.attention import fuse_attention_
from sparseft.runtime.fuse import fuse_siblings_
from sparseft.runtime.heap import release_freed_memory
from sparseft.runtime.linear import DenseLinear, SparseLinear
from sparseft.runtime.norm import fuse_norms_
from sparseft.runtime.packing import Values, pack_dense, pack_full_int8
from sparseft.runtime.reader import TensorReader
from sparseft.runtime.weights import check_values, default_values, packed_from_parts, read_parts

HEAD_VALUES = ("bf16", "int8")


def _head_name(model: nn.Module) -> str:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    return next((name for name, module in model.named_modules() if module is head), "")


def fast_head_(model: nn.Module, values: Values = "bf16") -> None:
    """Give the LM head a decoding kernel that reads its weight near memory speed (torch's CPU GEMV does not).

    "bf16": our dense bf16 GEMV over the same weight, exact. "int8": the head quantized per row to int8 and run
    by the int8 kernel with a full mask, half the bytes (a 1B model's head is a sixth to a quarter of its bytes
    per token at 70% sparsity); logits move by the int8 rounding, and a tied head keeps its embedding besides
    the copy."""
    check_values(values, HEAD_VALUES)
    name = _head_name(model)
    head = model.get_submodule(name) if name else None
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        return
    if values == "int8":
        replace_module(model, name, SparseLinear(pack_full_int8(head.weight), head.bias))
    elif head.weight.dtype == torch.bfloat16:
        replace_module(model, name, DenseLinear(head))


def sparsify_(
    model: nn.Module,
    values: Values = "bf16",
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
    fast_head: bool = True,
    head_values: Values = "bf16",
    fuse: bool = True,
) -> dict[str, Any]:
    """Replace the target linears of `model` by `SparseLinear`s holding their nonzeros as `values` ("bf16", "int8"
    with per-row scales, or "int4" with scales per group of 128 columns). `targets`/`ignore`: module names, class
    names or `re:` patterns, as for pruning;
    with `targets` named, `model` can be any module (`sparsify_(nn.Sequential(linear), targets=["0"])`), without
    them every linear in its transformer blocks is a target.
    `fast_head`: give the LM head a fast decoding kernel too, with `head_values` (see `fast_head_`).
    `fuse`: run each q/k/v and gate/up group as one kernel call (`fuse.fuse_siblings_`), and Llama-style
    norms and decoding attention as one op each (`norm`, `attention`).
    Returns a summary: layers converted, their dense and compressed bytes, groups fused."""
    check_values(values)
    chosen = find_targets(model, targets, ignore)
    dense_bytes = sparse_bytes = 0
    for name, module in chosen.items():
        matrix = weight_matrix(module)
        bias = getattr(module, "bias", None)
        sparse = SparseLinear(pack_dense(matrix, values, name), bias)
        dense_bytes += matrix.numel() * matrix.element_size()
        sparse_bytes += sparse.nbytes()
        replace_module(model, name, sparse)
    fused = _fuse(model) if fuse else dict.fromkeys(_FUSED, 0)
    if fast_head:
        fast_head_(model, head_values)
    return {
        "layers": len(chosen),
        "values": values,
        "dense_bytes": dense_bytes,
        "sparse_bytes": sparse_bytes,
        **fused,
    }


_FUSED = ("fused_groups", "fused_norms", "fused_attention")


def _fuse(model: nn.Module) -> dict[str, int]:
    """Fewer, larger calls per token: sibling linears, Llama-style norms, decoding attention."""
    counts = (fuse_siblings_(model), fuse_norms_(model), fuse_attention_(model))
    return dict(zip(_FUSED, counts, strict=True))


def _skeleton(config_dict: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model with its parameters on the meta device (no memory) and its buffers real (rotary tables)."""
    from accelerate import init_empty_weights

    return build_model(config_dict, dtype, trust_remote_code, init_empty_weights(include_buffers=False))


def _sparse_from_parts(
    parts: dict[str, Any], name: str, module: nn.Module, values: Values, bias: torch.Tensor | None
) -> SparseLinear:
    rows, cols = parts["shape"]
    if not is_linear(module) or tuple(weight_matrix(module).shape) != (rows, cols):
        shape = tuple(weight_matrix(module).shape) if is_linear(module) else type(module).__name__
        raise SparseftError(
            f"{name} is ({rows}, {cols}) in the archive but {shape} in the model its config builds; "
            "the archive was written for a different model: export it again"
        )
    return SparseLinear(packed_from_parts(parts, name, values), bias)


DECODERS = ("auto", "sparseft", "transformers")


def load(
    directory: str | Path,
    values: Values | None = None,
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
    fast_head: bool = True,
    head_values: Values = "bf16",
    fuse: bool = True,
    decoder: str = "auto",
) -> nn.Module:
    """A model on the sparse runtime from a bitmask archive (read straight into the packed layout, never dense) or
    a pruned HF checkpoint (packed as it loads).

    `decoder`: "sparseft" is the runtime's own model code (Llama, Mistral, Qwen2/3, Phi-3: `models.LlamaDecoder`,
    with `generate` and a forward that returns logits; Whisper: `models.WhisperModel`, with `encode` and
    `generate`, greedy, sampled or beam search); "transformers" is the transformers model with its linears
    swapped for `SparseLinear` (any architecture; what lm-eval and other transformers tools need); "auto" takes
    the own decoder where it covers the model and warns when a listed architecture falls back. The model's
    `decoder_name` says which runs.
    `values` defaults to how the archive stores them (int8, int4; "bf16" when unquantized); `dtype` is the dtype
    of everything that stays dense. `fast_head`/`head_values`: the LM head's decoding kernel (see `fast_head_`); `fuse`
    (transformers path): one kernel call per q/k/v and gate/up group and one op per norm and
    decoding attention where the architecture allows.
    """
    from sparseft.runtime import models

    if decoder not in DECODERS:
        raise SparseftError(f"decoder must be one of {', '.join(DECODERS)}, got {decoder!r}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise SparseftError(f"the sparse runtime runs in bfloat16 or float32, not {dtype}; pass one of those")
    if values is not None:
        check_values(values)
    check_values(head_values, HEAD_VALUES)
    reason = "asked for"
    if decoder != "transformers":
        try:
            return models.load_own(directory, values, dtype, head_values if fast_head else None)
        except models.NotCovered as e:
            reason = str(e)
            if decoder == "sparseft":
                raise SparseftError(
                    f"the sparseft decoder does not run {directory}: {reason}; use decoder='transformers'"
                ) from None
            if e.listed:
                warnings.warn(
                    f"{directory} runs on transformers' model code (slower): {reason}",
                    SparseftWarning,
                    stacklevel=2,
                )
    if formats.detect(directory) == "bitmask":
        model = _load_archive(directory, values, dtype, trust_remote_code, fast_head, head_values, fuse)
    else:
        model = formats.load_dir(directory, dtype, trust_remote_code)
        sparsify_(model, values or "bf16", fast_head=fast_head, head_values=head_values, fuse=fuse)
    object.__setattr__(model, "decoder_name", f"transformers ({reason})")
    return model


def _load_archive(
    directory: str | Path,
    values: Values | None,
    dtype: torch.dtype,
    trust_remote_code: bool,
    fast_head: bool,
    head_values: Values,
    fuse: bool,
) -> nn.Module:

    archive = read_archive(directory)
    quant = archive.quantization
    values = values or default_values(quant)
    model = _skeleton(archive.config, dtype, trust_remote_code)
    reader = TensorReader(archive.path, archive.shards.weight_map)

    compressed = archive.compressed_names()
    tensor_names = set(archive.tensor_names())
    for name in compressed:
        module_name = name.removesuffix(".weight")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            raise SparseftError(
                f"the archive compresses {name}, which the model built from its config lacks; "
                "the archive was written for a different model"
            ) from None
        bias_name = module_name + ".bias"
        if (getattr(module, "bias", None) is not None) != (bias_name in tensor_names):
            which = "lacks" if bias_name not in tensor_names else "holds"
            raise SparseftError(
                f"the archive {which} {bias_name}, unlike the model its config builds; "
                "the archive was written for a different model"
            )
        bias = reader.read(bias_name) if bias_name in tensor_names else None
        tensor_names.discard(bias_name)
        parts = read_parts(reader, archive, name)
        replace_module(model, module_name, _sparse_from_parts(parts, name, module, values, bias))
        del parts
        release_freed_memory()  # as we go: the peak is what counts

    # An LM head about to be quantized is read, not mapped: mapped pages, once touched, stay resident beside
    # the int8 copy for as long as the file's mapping lives (the embeddings keep it open).
    quantized_head = _head_name(model) + ".weight" if fast_head and head_values == "int8" else None
    state = {}
    for name in tensor_names:
        # Tensors already in the model's dtype are mapped, not read: see TensorReader.map.
        mapped = reader.dtype(name) == dtype and name != quantized_head
        tensor = reader.map(name) if mapped else reader.read(name)
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor whose shape differs from the model's
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise SparseftError(
            f"the archive does not fit the model its config builds ({detail}); export it again"
        ) from None
    if result.unexpected_keys:
        raise SparseftError(
            f"the archive holds {result.unexpected_keys[0]}, which the model built from its config lacks; "
            "the archive was written for a different model"
        )
    # the LM head shares the embeddings when the config ties them (they are stored once)
    model.tie_weights()  # type: ignore[operator]
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if missing:
        raise SparseftError(
            f"{directory} lacks {missing[0]} (and {len(missing) - 1} more tensors) that the model needs"
        )
    del state
    if fuse:
        _fuse(model)
    if fast_head:
        fast_head_(model, head_values)
    release_freed_memory()
    return model
