"""Translation and speech recognition scores of an encoder-decoder model: its generated text (`seq2seq_generate`)
scored by BLEU or WER against the references."""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import ConfigDict, model_validator
from torch import nn
from tqdm.auto import tqdm

from sparseft.data.seq2seq import PairFields
from sparseft.errors import SparseftError

# Translation and speech recognition. BLEU is sacreBLEU's corpus BLEU (13a tokenisation, its defaults) on
# beam-search output, as the paper scores T5 on WMT14; WER is jiwer's word error rate after Whisper's text
# normalisation ("basic": lower case, punctuation and bracketed text removed, any language; "english":
# Whisper's English normaliser, which also spells out numbers, contractions and British spellings).
NORMALIZERS = ("basic", "english", "none")


class Seq2SeqEvalConfig(PairFields):
    """What BLEU or WER is measured on and how: the dataset and where its pairs sit (`PairFields`; for speech,
    `target_lang` is the language Whisper is told to transcribe in, `text_field` the transcript column), the
    normaliser WER compares after, at most `limit` examples, and the decoding: `num_beams` (None: 5 for BLEU, as
    the paper; greedy for WER), `max_new_tokens`, `batch_size`."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    text_field: str = "text"
    normalizer: str = "basic"
    limit: int | None = None
    batch_size: int = 16
    num_beams: int | None = None
    max_new_tokens: int = 256

    @model_validator(mode="after")
    def _valid(self) -> Seq2SeqEvalConfig:
        if self.normalizer not in NORMALIZERS:
            raise ValueError(f"unknown normalizer {self.normalizer!r}; use one of {', '.join(NORMALIZERS)}")
        counts = (
            self.batch_size,
            self.num_beams or 1,
            self.max_new_tokens,
            1 if self.limit is None else self.limit,
        )
        if min(counts) < 1:
            raise ValueError("batch_size, num_beams, max_new_tokens and limit must be at least 1")
        return self


def _metric_package(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise SparseftError(f"this metric needs {name}: pip install 'sparseft[eval]'") from None


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU of `hypotheses` against one reference each, with sacreBLEU's signature."""
    sacrebleu = _metric_package("sacrebleu")

    if len(hypotheses) != len(references) or not references:
        raise SparseftError(
            f"BLEU needs one reference per hypothesis, got {len(hypotheses)} and {len(references)}"
        )
    metric = sacrebleu.BLEU()
    score = metric.corpus_score(list(hypotheses), [list(references)])
    return {"bleu": score.score, "signature": str(metric.get_signature())}


def basic_normalize(text: str) -> str:
    """Whisper's basic normalisation (lower case; bracketed and parenthesised asides, punctuation and symbols
    dropped; whitespace collapsed), except that combining marks stay: Whisper's own turns them into spaces, which
    splits every Hindi word at its vowel signs (the paper's Common Voice Hindi task)."""
    text = re.sub(r"[<\[][^>\]]*[>\]]|\([^)]+?\)", "", unicodedata.normalize("NFKC", text).lower())
    text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
    return re.sub(r"\s+", " ", text).strip()


def text_normalizer(name: str) -> Any:
    """A text normaliser by name (see NORMALIZERS), a callable str -> str: "basic" (`basic_normalize`),
    "english" (Whisper's English normaliser), "none"."""
    # Imported on first use: it is slow to import (Whisper's tokenizer comes with it), and rarely needed.
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    if name == "basic":
        return basic_normalize
    if name == "english":
        return EnglishTextNormalizer({})
    if name == "none":
        return lambda text: text
    raise SparseftError(f"unknown normalizer {name!r}; use one of {', '.join(NORMALIZERS)}")


def wer(hypotheses: Sequence[str], references: Sequence[str], normalizer: str = "basic") -> dict[str, Any]:
    """Word error rate over the corpus after normalising both sides; pairs whose reference normalises to
    nothing are left out (WER is undefined there) and counted."""
    jiwer = _metric_package("jiwer")

    if len(hypotheses) != len(references) or not references:
        raise SparseftError(
            f"WER needs one reference per hypothesis, got {len(hypotheses)} and {len(references)}"
        )
    norm = text_normalizer(normalizer)
    pairs = [(norm(h).strip(), norm(r).strip()) for h, r in zip(hypotheses, references, strict=True)]
    kept = [(h, r) for h, r in pairs if r]
    if not kept:
        raise SparseftError("every reference transcript is empty after normalisation; check --text-field")
    score = jiwer.wer([r for _, r in kept], [h for h, _ in kept])
    return {"wer": float(score), "normalizer": normalizer, "skipped_empty_references": len(pairs) - len(kept)}


@torch.inference_mode()
def seq2seq_generate(
    model: nn.Module,
    tokenizer: Any,
    batches: Sequence[dict[str, torch.Tensor]],
    num_beams: int = 5,
    max_new_tokens: int = 128,
    progress: bool = False,
    **generate_options: Any,
) -> list[str]:
    """Decoded outputs of an encoder-decoder model for batches of encoder inputs (input_ids + attention_mask,
    or input_features), by beam search (`num_beams` 1: greedy)."""
    weight = next(model.parameters())
    texts: list[str] = []
    for batch in tqdm(batches, desc="generate", disable=not progress):
        # Audio features follow the model's dtype (a bf16 Whisper's conv stem refuses float32 input).
        inputs = {
            k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype)
            for k, v in batch.items()
        }
        out = model.generate(  # type: ignore[operator]
            **inputs,
            num_beams=num_beams,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **generate_options,
        )
        texts += [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
    return texts
