"""Converted Llama, Mistral, Qwen2/3, Phi-3 and Whisper decoder layers decode through the direct path with the logits of
their own forward, bit for bit, and every step the path does not cover runs the layer's own forward."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from sparseft.runtime import convert, dispatch
from sparseft.runtime.decode_layer import fuse_layers_

needs_avx512 = pytest.mark.skipif(
    dispatch.best_isa() != "avx512", reason="the path takes the AVX-512 ops (attention among them)"
)


def _converted(dense: transformers.PreTrainedModel, direct: bool, monkeypatch: pytest.MonkeyPatch) -> Any:
    model = copy.deepcopy(dense)
    with monkeypatch.context() as patch:
        if not direct:
            patch.setattr(convert, "fuse_layers_", lambda m: 0)
        summary = convert.sparsify_(model, "int8")
    assert summary["fused_layers"] == (model.config.num_hidden_layers if direct else 0)
    return model


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


def _steps(model: Any, prompt: torch.Tensor, steps: int, **kwargs: Any) -> list[torch.Tensor]:
    """Logits of greedy decoding steps after `prompt`, one forward at a time over a DynamicCache."""
    cache = transformers.DynamicCache(config=model.config)
    out = []
    with torch.inference_mode():
        logits = model(prompt, past_key_values=cache, use_cache=True, **kwargs).logits
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            if "attention_mask" in kwargs:
                mask = kwargs["attention_mask"] = torch.cat(
                    [kwargs["attention_mask"], torch.ones_like(token)], 1
                )
                kwargs["position_ids"] = mask.sum(1, keepdim=True) - 1
            logits = model(token, past_key_values=cache, use_cache=True, **kwargs).logits
            out.append(logits)
    return out


@needs_avx512
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_decoding_steps_take_the_direct_path_bit_for_bit(
    arch: str, monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., Any]
) -> None:
    dense = decoder_model(arch, sparsity=0.7)
    direct, own = _converted(dense, True, monkeypatch), _converted(dense, False, monkeypatch)
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    expected = _steps(own, prompt, 8)
    calls = _count_own_forward(direct, monkeypatch)
    got = _steps(direct, prompt, 8)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    layers = direct.config.num_hidden_layers
    if arch == "mistral":
        # once the window no longer covers every key the steps have a mask and take the layer's own forward
        assert layers < len(calls) < 9 * layers
    else:
        assert len(calls) == layers  # the prompt only
    calls.clear()
    with torch.inference_mode():
        generated = direct.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        if arch != "mistral":
            assert len(calls) == layers  # generate's decoding steps take the direct path too
        assert (
            generated.tolist()
            == own.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0).tolist()
        )


class _Doubled(torch.nn.Module):
    """A module put in a layer after conversion (an adapter, say): the layer's own forward calls it."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


@needs_avx512
@pytest.mark.parametrize(
    "case",
    [
        "a hook on a skipped module",
        "a padded batch (a mask)",
        "a forced instruction set",
        "a float32 model",
        "a module replaced since",
        "training mode",
        "an attention in training mode",  # as Monte-Carlo dropout leaves it
        "attention switched to SDPA since",
    ],
)
def test_what_the_path_does_not_cover_runs_the_layers_own_forward(
    case: str, monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., Any]
) -> None:
    dense = decoder_model(sparsity=0.7)
    direct, own = _converted(dense, True, monkeypatch), _converted(dense, False, monkeypatch)
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    kwargs: dict[str, Any] = {}
    seen: list[int] = []
    if case == "a hook on a skipped module":
        for layer in direct.model.layers:
            layer.mlp.register_forward_hook(lambda *args: seen.append(1))
    elif case == "a padded batch (a mask)":
        prompt = torch.cat([prompt, prompt + 1])
        mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
        kwargs = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
    elif case == "a forced instruction set":
        monkeypatch.setenv("SPARSEFT_ISA", "avx2")
    elif case == "a float32 model":
        direct, own = direct.float(), own.float()
    elif case == "a module replaced since":
        for model in (direct, own):
            for layer in model.model.layers:
                layer.mlp.down_proj = _Doubled(layer.mlp.down_proj)
    elif case == "training mode":
        for model in (direct, own):
            model.train()
    elif case == "an attention in training mode":
        for model in (direct, own):
            for layer in model.model.layers:
                layer.self_attn.train()
    else:
        for model in (direct, own):
            model.config._attn_implementation = "sdpa"
    expected = _steps(own, prompt, 4, **copy.deepcopy(kwargs))
    calls = _count_own_forward(direct, monkeypatch)
    got = _steps(direct, prompt, 4, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(calls) == 5 * direct.config.num_hidden_layers  # the prompt and every step
    if case == "a hook on a skipped module":
        assert len(seen) == len(calls)


@needs_avx512
def test_asking_once_for_hidden_states_keeps_the_path(
    monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., Any]
) -> None:
    # transformers leaves its output-capturing hooks on every attention module after such a call
    dense = decoder_model(sparsity=0.7)
    direct, own = _converted(dense, True, monkeypatch), _converted(dense, False, monkeypatch)
    prompt = torch.tensor([[5, 17, 250, 3, 99, 42, 7]])
    with torch.inference_mode():
        hidden = direct(prompt, output_hidden_states=True).hidden_states
        assert len(hidden) == direct.config.num_hidden_layers + 1
    assert direct.model.layers[0].self_attn._forward_hooks
    expected = _steps(own, prompt, 4)
    calls = _count_own_forward(direct, monkeypatch)
    got = _steps(direct, prompt, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(calls) == direct.config.num_hidden_layers  # the prompt only


@needs_avx512
@pytest.mark.parametrize("arch", ["llama", "whisper"])
@pytest.mark.parametrize("renamed", [False, True])
def test_a_layer_whose_forward_differs_keeps_it(
    arch: str,
    renamed: bool,
    monkeypatch: pytest.MonkeyPatch,
    decoder_model: Callable[..., Any],
    whisper_model: Callable[..., Any],
) -> None:
    model = whisper_model(sparsity=0.7) if arch == "whisper" else decoder_model(sparsity=0.7)
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
def test_a_model_converted_in_training_mode_takes_the_path_in_eval_mode(
    monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., Any]
) -> None:
    model = decoder_model(sparsity=0.7).train()
    assert convert.sparsify_(model, "bf16")["fused_layers"] == model.config.num_hidden_layers
    assert model.model.layers[0].training and model.model.layers[0].mlp.down_proj.training  # modes kept
    model.eval()
    calls = _count_own_forward(model, monkeypatch)
    _steps(model, torch.tensor([[5, 17, 250, 3]]), 3)
    assert len(calls) == model.config.num_hidden_layers  # the prompt only


@needs_avx512
def test_copies_and_other_architectures(
    monkeypatch: pytest.MonkeyPatch, decoder_model: Callable[..., Any]
) -> None:
    model = _converted(decoder_model(sparsity=0.7), True, monkeypatch)
    clone = copy.deepcopy(model)
    for layer, copied in zip(model.model.layers, clone.model.layers, strict=True):
        # the copy's direct path reads the copy's own modules
        assert copied._decode_plan.qkv is copied.self_attn.q_proj.stacked.linear
        assert copied._decode_plan.qkv is not layer._decode_plan.qkv
    assert fuse_layers_(model) == model.config.num_hidden_layers  # once is enough: nothing changes

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=128, n_layer=1, n_head=4, vocab_size=300)
    )
    assert convert.sparsify_(gpt2.to(torch.bfloat16), "bf16")["fused_layers"] == 0
    assert (
        fuse_layers_(decoder_model(sparsity=0.7)) == 0
    )  # its norms, rotary and attention are transformers' own
    phi3 = decoder_model("phi3", sparsity=0.7)
    for layer in phi3.model.layers:
        layer.self_attn.qkv_proj = _Doubled(layer.self_attn.qkv_proj)  # wrapped before conversion
    assert convert.sparsify_(phi3, "bf16")["fused_layers"] == 0
    # Phi-4-mini style partial rotary (half of each head), which the rotary op does not take: the check fails
    partial = decoder_model("phi3", sparsity=0.7, partial_rotary_factor=0.5)
    assert convert.sparsify_(partial, "bf16")["fused_layers"] == 0


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
