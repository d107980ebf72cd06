"""Shared fixtures: a tokenizer trained offline once per session, and tiny saved models of several families."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

from sparseft.data import mathtask
from sparseft.demo.tiny import load_task_tokenizer, python_corpus, tiny_config, train_tokenizer
from sparseft.eval.gsm8k import gsm8k_prompt


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


@pytest.fixture(scope="session")
def math_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast, list[dict[str, str]], Path]:
    """A tiny Llama that has memorised the worked answers of 8 bundled math problems, so that its greedy
    answers are known: (model, the task tokenizer, the 8 records, a directory where both are saved)."""
    torch.manual_seed(0)
    tok = load_task_tokenizer()
    records = mathtask.generate(8, "test", seed=0)
    ids = {
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    model = transformers.LlamaForCausalLM(
        tiny_config("llama", vocab_size=len(tok), hidden=64, layers=2, **ids)
    )
    texts = [f"{gsm8k_prompt(r['question'])} {r['answer']}{tok.eos_token}" for r in records]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, record in enumerate(records):  # learn the answers only (the prompt is given at evaluation)
        labels[row, : len(tok(gsm8k_prompt(record["question"]))["input_ids"])] = -100
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):  # until every answer token is predicted right with a margin; ~80 steps
        out = model(**batch, labels=labels)
        right = (out.logits[:, :-1].argmax(-1) == labels[:, 1:]) | (labels[:, 1:] == -100)
        if bool(right.all()) and out.loss.item() < 0.05:
            break
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    path = tmp_path_factory.mktemp("math-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, records, path


@pytest.fixture(scope="session")
def exported_llama(tmp_path_factory: pytest.TempPathFactory, make_model_dir: Callable[..., Path]) -> Path:
    """The tiny Llama pruned to 70% by magnitude and exported as a bitmask archive (bf16), for generation."""
    from sparseft import api

    root = tmp_path_factory.mktemp("exported-llama")
    api.prune(str(make_model_dir("llama")), root / "pruned", method="magnitude", sparsity=0.7, progress=False)
    api.export(str(root / "pruned"), root / "archive", dtype="bfloat16", progress=False)
    return root / "archive"


# A minimal chat template: each message as <|role|>content on its own line, then the assistant's tag.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="session")
def chat_llama(tmp_path_factory: pytest.TempPathFactory, exported_llama: Path) -> Path:
    """`exported_llama` with a tokenizer that has `CHAT_TEMPLATE`."""
    import shutil

    path = tmp_path_factory.mktemp("chat-llama") / "archive"
    shutil.copytree(exported_llama, path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path
