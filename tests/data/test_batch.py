from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from sparseft.data import IGNORE_INDEX
from sparseft.data.batch import collate, model_inputs, task_calibration
from sparseft.data.seq2seq import PairSource, load_examples
from sparseft.data.tasks import DataConfig, build_rows
from tests.helpers import encoding, write_jsonl, write_pairs, write_speech


def test_collate_pads_with_masked_labels(tok, tmp_path):
    data = write_jsonl(
        tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}, {"question": "qq " * 5, "answer": "b"}]
    )
    rows = build_rows(tok, DataConfig(dataset=data))
    batch = collate(rows, tok.pad_token_id)
    short = min(range(2), key=lambda i: len(rows[i].input_ids))
    n = len(rows[short].input_ids)
    assert batch["attention_mask"][short, :n].all() and not batch["attention_mask"][short, n:].any()
    assert (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask"}


def test_calibration_windows_come_from_the_task_tokens(tok, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(20)])
    rows = build_rows(tok, DataConfig(dataset=data))
    windows = task_calibration(rows, 4, 16, seed=0)
    assert windows.shape == (4, 16)
    assert set(windows.flatten().tolist()) <= {i for r in rows for i in r.input_ids}


def test_collate_masks_padding(t5_dir: Path, tmp_path: Path) -> None:
    source = PairSource(str(write_pairs(tmp_path / "p.jsonl", 8)), source_lang="en", target_lang="de")
    examples = load_examples(source, encoding(t5_dir, source))
    batch = collate(examples, pad_id=enc_pad(t5_dir))
    for i, e in enumerate(examples):
        n, m = len(e.input_ids or []), len(e.labels)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i, :m].tolist() == e.labels
        assert (batch["labels"][i, m:] == IGNORE_INDEX).all()
        assert (batch["decoder_input_ids"][i, m:] == enc_pad(t5_dir)).all()
    # The model's own loss on this batch is the CE over label tokens only: padding is ignored.
    model = transformers.T5ForConditionalGeneration.from_pretrained(t5_dir)
    alone = [model(**collate([e], 0)).loss.item() * len(e.labels) for e in examples]
    together = model(**batch).loss.item() * sum(len(e.labels) for e in examples)
    assert together == pytest.approx(sum(alone), rel=1e-4)


def enc_pad(model_dir: Path) -> int:
    return int(transformers.AutoConfig.from_pretrained(model_dir).pad_token_id)


def test_calibration_samples_are_model_inputs(whisper_dir: Path, t5_dir: Path, tmp_path: Path) -> None:
    speech = PairSource(str(write_speech(tmp_path / "s", 3)))
    samples = task_calibration(load_examples(speech, encoding(whisper_dir, speech)), 2, 64, seed=0)
    assert len(samples) == 2 and set(samples[0]) == {"input_features", "decoder_input_ids"}
    model = transformers.WhisperForConditionalGeneration.from_pretrained(whisper_dir)
    assert model(**samples[0]).logits.shape[:2] == samples[0]["decoder_input_ids"].shape

    pairs = PairSource(str(write_pairs(tmp_path / "p.jsonl", 5)), source_lang="en", target_lang="de")
    examples = load_examples(pairs, encoding(t5_dir, pairs))
    first, again = task_calibration(examples, 3, 64, 1), task_calibration(examples, 3, 64, 1)
    assert [set(s) for s in first] == [{"input_ids", "decoder_input_ids"}] * 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again, strict=True))
