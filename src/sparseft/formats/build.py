"""A transformers model built from a checkpoint's config dict, empty, then filled tensor by tensor: how every
export that transformers cannot load on its own (a bitmask archive, compressed-tensors weights) becomes a dense
model again."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.initialization import no_init_weights

from sparseft.errors import SparseftError
from sparseft.hf import model_class

# The blocks of an HF config that describe compressed weights; sparseft reads those weights itself.
COMPRESSION_KEYS = ("quantization_config", "compression_config")


def config_from_dict(config_dict: dict[str, Any]) -> Any:
    """The transformers config of a checkpoint's or archive's config dict (its compression and quantization
    blocks left out: the weights are read by sparseft)."""
    config_dict = {k: v for k, v in config_dict.items() if k not in COMPRESSION_KEYS}
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
    config = config_from_dict(config_dict)
    architectures = config_dict.get("architectures") or []
    arch_class = getattr(transformers, architectures[0], None) if architectures else None
    with empty:
        if arch_class is not None:
            model = arch_class._from_config(config, dtype=dtype)
        else:
            model = model_class(config).from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval()


def empty_model(config_dict: dict[str, Any], dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """An uninitialised model of the config's architecture; the caller fills every tensor."""
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


def fill(model: nn.Module, provide: dict[str, Any], directory: Path) -> None:
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
