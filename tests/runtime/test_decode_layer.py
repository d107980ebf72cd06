"""Converted Whisper decoder layers decode through the direct path with the logits of their own forward, bit for bit,
and every step the path does not cover runs the layer's own forward."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from sparseft.runtime import convert, dispatch

needs_avx512 = pytest.mark.skipif(
    dispatch.best_isa() != "avx512", reason="the path takes the AVX-512 ops (attention among them)"
)


def _decoder_layers(model: Any) -> Any:
    return model.model.decoder.layers if hasattr(model.model, "decoder") else model.model.layers


def _count_own_forward(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the layer class's own forward (the fallback) from here on."""
    cls = type(_decoder_layers(model)[0]).__mro__[1]
    calls: list[int] = []
    own = cls.forward

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return own(self, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counted)
    return calls


@needs_avx512
@pytest.mark.parametrize("renamed", [False, True])
def test_a_layer_whose_forward_differs_keeps_it(
    renamed: bool, monkeypatch: pytest.MonkeyPatch, whisper_model: Callable[..., Any]
) -> None:
    model = whisper_model(sparsity=0.7)
    layer_class = type(_decoder_layers(model)[0])
    original = layer_class.forward

    def changed(self: Any, *args: Any, **kwargs: Any) -> Any:
        if renamed:  # a future release whose forward takes other arguments
            raise TypeError("forward() got an unexpected keyword argument")
        return original(self, *args, **kwargs) * 2  # a future release computing something else

    monkeypatch.setattr(layer_class, "forward", changed)
    assert convert.sparsify_(model, "bf16")["fused_layers"] == 0
    assert type(_decoder_layers(model)[0]) is layer_class


@needs_avx512
@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_llama_family_layers_keep_transformers_forward(arch: str, decoder_model: Callable[..., Any]) -> None:
    # the runtime's own decoder runs these architectures; their transformers path takes no class swap
    model = decoder_model(arch, sparsity=0.7)
    layer_class = type(model.model.layers[0])
    assert convert.sparsify_(model, "bf16")["fused_layers"] == 0
    assert type(model.model.layers[0]) is layer_class


def _transcribe(model: Any, features: torch.Tensor, **kwargs: Any) -> Any:
    with torch.inference_mode():
        return model.generate(
            features,
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )


@needs_avx512
@pytest.mark.parametrize("case", ["greedy", "beam search", "bf16 values", "a hook on a skipped module"])
def test_whisper_decoding_steps_take_the_direct_path_bit_for_bit(
    case: str, monkeypatch: pytest.MonkeyPatch, whisper_model: Callable[..., Any]
) -> None:
    dense = whisper_model(sparsity=0.7)
    layers = dense.config.decoder_layers
    direct, own = (copy.deepcopy(dense) for _ in range(2))
    values = "bf16" if case == "bf16 values" else "int8"
    assert convert.sparsify_(direct, values)["fused_layers"] == layers
    with monkeypatch.context() as patch:
        patch.setattr(convert, "fuse_layers_", lambda m: 0)
        convert.sparsify_(own, values)
    features = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(0)).bfloat16()
    options = {"num_beams": 3} if case == "beam search" else {}
    expected = _transcribe(own, features, **options)
    seen: list[int] = []
    if case == "a hook on a skipped module":
        for layer in direct.model.decoder.layers:  # the step calls layer_norm itself, not the module
            layer.final_layer_norm.register_forward_hook(lambda *args: seen.append(1))
    calls = _count_own_forward(direct, monkeypatch)
    got = _transcribe(direct, features, **options)
    assert got.sequences.tolist() == expected.sequences.tolist()
    assert all(torch.equal(a, b) for a, b in zip(got.scores, expected.scores, strict=True))
    if case == "a hook on a skipped module":
        assert len(calls) == len(seen) == 8 * layers  # every step
    else:
        assert len(calls) == layers  # the first step only: it computes the encoder's keys and values
