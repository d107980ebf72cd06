"""The runtime's own decoding models (gpt-fast's way: the model code is ours, the weights are converted once at
load). `load_own` builds one for the architectures it covers and raises `NotCovered`, naming the reason, for
the rest, which run on transformers' model code with sparse linears swapped in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparseft.formats import config_from_dict
from sparseft.runtime.models import llama, whisper
from sparseft.runtime.models.llama import LlamaDecoder, NotCovered
from sparseft.runtime.models.whisper import WhisperModel
from sparseft.runtime.packing import Values
from sparseft.runtime.weights import CheckpointWeights, default_values

__all__ = ["ARCHITECTURES", "LlamaDecoder", "NotCovered", "WhisperModel", "covered", "load_own"]

ARCHITECTURES = llama.ARCHITECTURES | {"whisper"}


def covered(config: Any) -> None:
    """Nothing if an own decoder runs the transformers config `config`, else NotCovered with the reason."""
    if config.model_type == "whisper":
        whisper.whisper_config(config)
    else:
        llama.llama_config(config)


def load_own(
    directory: str | Path, values: Values | None, dtype: torch.dtype, head_values: Values | None
) -> LlamaDecoder | WhisperModel:
    """The own decoder of a bitmask archive or a pruned HF checkpoint. `values` defaults to int8 for an int8
    archive, int4 for an int4 one, bf16 otherwise; `head_values` None keeps the LM head as stored (no fast kernel)."""
    from transformers import GenerationConfig

    weights = CheckpointWeights(directory)
    hf_config = config_from_dict(weights.config)
    covered(hf_config)  # before reading any weight
    quant = weights.quantization
    values = values or default_values(quant)
    if (weights.directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(weights.directory)
    else:
        generation = GenerationConfig.from_model_config(hf_config)
    build = whisper.build if hf_config.model_type == "whisper" else llama.build
    return build(weights, hf_config, values, dtype, head_values, generation)
