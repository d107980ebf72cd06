"""Shared fixtures: a tokenizer trained offline once per session, and tiny saved models of several families."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft.tiny import python_corpus, tiny_config, train_tokenizer


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return python_corpus(max_chars=200_000)


@pytest.fixture(scope="session")
def tokenizer(corpus: list[str]) -> transformers.PreTrainedTokenizerFast:
    return train_tokenizer(corpus, vocab_size=384)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory, corpus: list[str]) -> Path:
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text("\n\n".join(corpus[:20]))
    return path


@pytest.fixture(scope="session")
def make_model_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast
) -> Callable[..., Path]:
    """Save a randomly initialised tiny model of `arch` with the shared tokenizer; cached per arguments."""
    cache: dict[tuple[str, int, int], Path] = {}

    def make(arch: str = "llama", hidden: int = 64, layers: int = 2) -> Path:
        key = (arch, hidden, layers)
        if key not in cache:
            torch.manual_seed(0)
            config = tiny_config(arch, vocab_size=len(tokenizer), hidden=hidden, layers=layers)
            model = transformers.AutoModelForCausalLM.from_config(config)
            path = tmp_path_factory.mktemp(f"{arch}-{hidden}-{layers}")
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = path
        return cache[key]

    return make
