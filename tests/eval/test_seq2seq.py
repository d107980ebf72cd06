"""BLEU and WER: sacreBLEU's and jiwer's figures, after the text normalisers."""

from __future__ import annotations

from pathlib import Path

import jiwer
import pytest
import sacrebleu

from sparseft import api
from sparseft.errors import SparseftError
from sparseft.eval.seq2seq import Seq2SeqEvalConfig, bleu, text_normalizer, wer

HYPOTHESES = ["the cat sat on the mat", "a dog runs in the park today", "Hello, World!", "it is 5 o'clock"]
REFERENCES = ["the cat sat on a mat", "the dog runs in the park", "hello world", "It's five o'clock."]


def test_bleu_is_sacrebleu() -> None:
    result = bleu(HYPOTHESES, REFERENCES)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert bleu(REFERENCES, REFERENCES)["bleu"] == pytest.approx(100.0)
    assert "tok:13a" in result["signature"]


@pytest.mark.parametrize("normalizer", ["basic", "english", "none"])
def test_wer_is_jiwer_after_normalisation(normalizer: str) -> None:
    norm = text_normalizer(normalizer)
    expected = jiwer.wer([norm(r).strip() for r in REFERENCES], [norm(h).strip() for h in HYPOTHESES])
    assert wer(HYPOTHESES, REFERENCES, normalizer)["wer"] == pytest.approx(expected)
    assert wer(["HELLO, world."], ["hello world"], "basic")["wer"] == 0.0


def test_basic_normalisation_keeps_the_vowel_signs_of_indic_scripts() -> None:
    from transformers.models.whisper.english_normalizer import BasicTextNormalizer

    assert text_normalizer("basic")("नमस्ते, दुनिया!") == "नमस्ते दुनिया"  # two words, signs kept
    assert len(BasicTextNormalizer()("नमस्ते दुनिया").split()) > 2  # Whisper's own splits them
    for text in [
        "HELLO, world.",
        "It's [noise] a (cough) test!",
        "  Ünïcode\tспасибо  ",
    ]:  # Latin and Cyrillic
        assert text_normalizer("basic")(text) == BasicTextNormalizer()(text).strip()
    assert wer(["नमस्ते दुनिया"], ["नमस्ते, दुनिया।"], "basic")["wer"] == 0.0


def test_wer_skips_empty_references_and_rejects_mismatches() -> None:
    result = wer(["x", "a b"], ["(noise)", "a c"], "basic")
    assert result["wer"] == 0.5 and result["skipped_empty_references"] == 1
    with pytest.raises(SparseftError, match="one reference per hypothesis"):
        bleu(["a"], ["a", "b"])
    with pytest.raises(SparseftError, match="unknown normalizer"):
        wer(["a"], ["a"], "french")


def test_seq2seq_settings_are_checked_before_anything_loads(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-model")
    with pytest.raises(SparseftError, match="unknown normalizer 'loud'"):
        api.eval_seq2seq(missing, "wer", "x.jsonl", normalizer="loud")
    config = Seq2SeqEvalConfig(dataset="x.jsonl", batch_size=2)
    with pytest.raises(
        SparseftError, match="batch_size, num_beams, max_new_tokens and limit must be at least 1"
    ):
        api.eval_seq2seq(missing, "bleu", config=config, limit=0)
    with pytest.raises(SparseftError, match="bleu needs --dataset"):
        api.eval_seq2seq(missing, "bleu")
