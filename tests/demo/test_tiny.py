from __future__ import annotations

import pytest
import torch
import transformers

from sparseft.data import mathtask
from sparseft.demo import tiny


@pytest.fixture(scope="module")
def problems() -> dict[str, list[dict[str, str]]]:
    return {"test": mathtask.generate(200, "test", seed=0)}


def test_shipped_tokenizer_is_small_lossless_and_splits_digits(
    problems: dict[str, list[dict[str, str]]],
) -> None:
    assert tiny.TOKENIZER_FILE.stat().st_size < 200_000
    tok = tiny.load_task_tokenizer()
    assert (
        tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id
    )
    for record in problems["test"][:200]:
        text = f"Question: {record['question']}\nAnswer: {record['answer']}"
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert len(ids) < 200  # words are merged: far fewer tokens than characters
        tokens = tok.convert_ids_to_tokens(ids)
        assert all(len(t.lstrip("Ġ")) == 1 for t in tokens if any(ch.isdigit() for ch in t))


@pytest.mark.parametrize("native", [True, False])
def test_pretrain_autocasts_to_bf16_only_where_the_cpu_computes_in_bf16(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tiny, "native_bf16", lambda: native)
    model = transformers.AutoModelForCausalLM.from_config(tiny.tiny_config("llama", hidden=32, layers=1))
    seen: list[torch.dtype] = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    losses = tiny.pretrain(model, torch.arange(200) % 250, steps=2, seqlen=8, batch_size=2, progress=False)
    assert len(losses) == 2 and seen == [torch.bfloat16 if native else torch.float32] * 2
