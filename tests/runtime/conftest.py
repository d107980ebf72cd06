"""Runtime test helpers: weights with the awkward cases the kernels must handle (an empty row, a fully dense
row, sizes that are not multiples of 32 or 64), a pruned tiny Llama, tiny Llama-family decoders and a tiny
Whisper whose head size the decoding attention op takes, and a way to run an op on one thread and on several."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers

from sparseft.demo.tiny import tiny_config
from sparseft.hf import find_targets
from sparseft.pruning.magnitude import magnitude_prune


def _awkward_weight(rows: int, cols: int, sparsity: float = 0.7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    weight[torch.rand(rows, cols, generator=g) < sparsity] = 0
    weight[0] = 0  # an empty row
    if rows > 1:
        weight[-1] = torch.randn(cols, generator=g)  # a fully dense row
    return weight


@pytest.fixture
def awkward_weight() -> Callable[..., torch.Tensor]:
    return _awkward_weight


def _on_one_thread_and_several(run: Callable[[], Any]) -> tuple[Any, Any]:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(before, 2))
        return one, run()
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread_and_several() -> Callable[[Callable[[], Any]], tuple[Any, Any]]:
    """`run()`'s result on one of torch's threads, then on several; torch's setting is restored."""
    return _on_one_thread_and_several


def _prune_(model: transformers.PreTrainedModel, sparsity: float) -> transformers.PreTrainedModel:
    with torch.no_grad():
        for module in find_targets(model).values():
            module.weight.copy_(magnitude_prune(module.weight, sparsity))
    return model


def _pruned_model(
    arch: str = "llama", sparsity: float = 0.7, **extra: object
) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = tiny_config(arch, vocab_size=320, hidden=96, layers=2, **extra)
    return _prune_(transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval(), sparsity)


@pytest.fixture
def pruned_model() -> Callable[..., transformers.PreTrainedModel]:
    """A tiny model in bf16 whose block linears are magnitude-pruned to `sparsity`."""
    return _pruned_model


# 4 heads of 32: a head size the decoding attention op takes
_LLAMA_LIKE: dict[str, int] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=320,
)  # fmt: skip


_DECODER_CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,  # per-head norms of q and k; head size 128 by default
    "phi3": transformers.Phi3Config,  # q/k/v and gate/up stacked in its own weights
}


def _decoder_model(
    arch: str = "llama", attn: str = "sdpa", sparsity: float | None = None, **extra: object
) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    sizes: dict[str, object] = dict(_LLAMA_LIKE, vocab_size=300, attn_implementation=attn, **extra)
    if arch == "mistral":
        sizes["sliding_window"] = 10  # shorter than prompt + new tokens: late steps get a mask
    if arch == "phi3":
        sizes.update(pad_token_id=0, eos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(_DECODER_CONFIGS[arch](**sizes))
    model = model.to(torch.bfloat16).eval()
    return model if sparsity is None else _prune_(model, sparsity)


@pytest.fixture
def decoder_model() -> Callable[..., transformers.PreTrainedModel]:
    """A tiny Llama, Mistral (sliding window 10), Qwen2, Qwen3 or Phi-3 in bf16, optionally magnitude-pruned."""
    return _decoder_model


def _whisper_model(sparsity: float | None = None) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=100, d_model=128, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50,
        max_target_positions=64, pad_token_id=0, eos_token_id=1, bos_token_id=1, decoder_start_token_id=0,
        begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config).to(torch.bfloat16).eval()
    return model if sparsity is None else _prune_(model, sparsity)


@pytest.fixture
def whisper_model() -> Callable[..., transformers.PreTrainedModel]:
    """A tiny Whisper in bf16 (heads of 32, 2 decoder layers), optionally magnitude-pruned; its input features
    are (batch, 16, 100)."""
    return _whisper_model


# One small config per family: other attention, norm, MLP and position layouts than Llama's (ALiBi, parallel
# blocks, partial rotary, q/k/v stacked in one weight, GPT-2's transposed Conv1D weights). Heads of 32.
_FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "mistral": lambda: transformers.MistralConfig(**_LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=32),
    "phi3": lambda: transformers.Phi3Config(**_LLAMA_LIKE, pad_token_id=0, eos_token_id=1),
    "gemma": lambda: transformers.GemmaConfig(**_LLAMA_LIKE, head_dim=32, pad_token_id=0),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=128,
        vocab_size=320,
    ),
    "mpt": lambda: transformers.MptConfig(d_model=128, n_layers=2, n_heads=4, expansion_ratio=2, vocab_size=320),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=320
    ),
    "falcon": lambda: transformers.FalconConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=320
    ),
    "bloom": lambda: transformers.BloomConfig(hidden_size=128, n_layer=2, n_head=4, vocab_size=320),
    "gpt2": lambda: transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=320),  # Conv1D, int8 too
}  # fmt: skip


@pytest.fixture
def family_model() -> Callable[[str], transformers.PreTrainedModel]:
    """A tiny random model of a family in `_FAMILIES`, in bf16."""

    def build(family: str) -> transformers.PreTrainedModel:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_FAMILIES[family]())
        return model.to(torch.bfloat16).eval()

    return build
