"""Small offline building blocks for the demo, the benchmarks and the tests: a text corpus that every Python
install carries (its standard library's source), a byte-level BPE tokenizer trained on it, model configs of several
architectures at toy size, and the bundled math task's tokenizer. Nothing here touches the network.

The math task's tokenizer ships as a small file (assets/mathtask_tokenizer.json) rather than being trained on each
run: training it takes seconds and its merges depend on the local Python's standard library (part of its corpus),
so a shipped file is what keeps token ids, and with them a cached teacher, the same on every machine. Rebuild it
with `python -c "import sparseft.demo.tiny as t; t.train_task_tokenizer().backend_tokenizer.save(
str(t.TOKENIZER_FILE), pretty=False)"`, and only together with anything trained on it.
"""

from __future__ import annotations

import math
import random
import sysconfig
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm

from sparseft.data import mathtask
from sparseft.data.text import random_windows
from sparseft.io import atomic_dir

TOKENIZER_FILE = Path(__file__).parent / "assets" / "mathtask_tokenizer.json"
SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<pad>"}


def python_corpus(max_chars: int = 2_000_000, seed: int = 0) -> list[str]:
    """Source files of Python's standard library, shuffled with `seed`, up to `max_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on `texts`; every string is encodable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )


def tiny_config(arch: str, vocab_size: int = 256, hidden: int = 64, layers: int = 2, **extra: Any) -> Any:
    """A toy config of a given architecture family, for tests and quick runs."""
    heads = max(hidden // 16, 2)
    common: dict[str, Any] = {"vocab_size": vocab_size}
    cfg: transformers.PretrainedConfig
    llama_like: dict[str, Any] = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 2, 1),
        max_position_embeddings=512,
        **common,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**llama_like)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**llama_like)
    elif arch == "mixtral":  # a mixture of experts: transformers 5 keeps each layer's experts in 3-D tensors
        cfg = transformers.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=512, **common)
    elif arch == "opt":
        cfg = transformers.OPTConfig(
            hidden_size=hidden,
            ffn_dim=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "mpt":
        cfg = transformers.MptConfig(
            d_model=hidden, n_layers=layers, n_heads=heads, max_seq_len=512, expansion_ratio=2, **common
        )
    elif arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=512,
            **common,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in extra.items():
        setattr(cfg, key, value)
    return cfg


def native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX-512 BF16, AMX). Without it (AVX2) torch emulates bf16 matmuls and a
    bf16-autocast training step takes an order of magnitude longer than a float32 one."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pretrain(
    model: Any,
    stream: Any,
    steps: int,
    seqlen: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> list[float]:
    """Train a small causal LM from scratch on random windows of a token stream (AdamW, cosine decay, bf16
    autocast where the CPU computes in bf16). Returns the loss of every step. For the demo and benchmarks, not for
    real models."""
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    bf16 = native_bf16()
    losses = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress)
    for step in bar:
        ids = random_windows(stream, batch_size, seqlen, seed=seed * 1_000_003 + step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def save_task_llama(directory: str | Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A randomly initialised small Llama with the bundled math task's shipped tokenizer, saved into `directory`
    (atomically; kept if it is already there): the starting point of the demo's and the loss study's teachers."""
    directory = Path(directory)
    if (directory / "config.json").is_file():
        return directory
    tokenizer = load_task_tokenizer()
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden=hidden,
        layers=layers,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory


def train_task_tokenizer(vocab_size: int = 2048) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE on task problems plus Python source (so broad pretraining text also encodes compactly).

    Digits are split one per token before BPE, as in LLaMA's tokenizer: a small model learns column arithmetic
    on single digits far more easily than on arbitrary multi-digit merges.
    """
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in mathtask.generate(20_000, "train", seed=0)
    ]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["eos_token"], SPECIAL_TOKENS["pad_token"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts + python_corpus(2_000_000), trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def load_task_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The shipped tokenizer of the bundled task (see the module docstring for why it ships)."""
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_FILE), **SPECIAL_TOKENS)
