"""Fixtures of the data tests: tiny T5 and Whisper directories, and a small tokenizer trained offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers

from sparseft.demo.tiny import python_corpus, train_tokenizer
from tests.helpers import save_t5, save_whisper


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast) -> Path:
    return save_t5(tmp_path_factory.mktemp("t5"), tokenizer)


@pytest.fixture(scope="module")
def whisper_dir(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: transformers.PreTrainedTokenizerFast
) -> Path:
    return save_whisper(tmp_path_factory.mktemp("whisper"), tokenizer)


@pytest.fixture(scope="module")
def tok() -> transformers.PreTrainedTokenizerFast:
    return train_tokenizer(python_corpus(100_000), 400)
