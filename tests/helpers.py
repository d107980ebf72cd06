"""Helpers shared by tests in several folders: tiny checkpoints pruned or saved in a given form, and synthetic
translation pairs and speech clips with the tiny T5 and Whisper that read them."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile
import torch
import transformers

import sparseft
from sparseft.data.seq2seq import Encoding, PairSource

RATE = 16_000
WORDS = ["cat", "dog", "house", "tree", "red", "blue", "small", "big", "runs", "sleeps", "the", "a"]
WHISPER_SECONDS = 2  # the tiny Whisper's window: 2 s of 16 kHz audio, 200 frames of 16 mel bins


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pruned_dir(make_model_dir: Callable[..., Path], tmp_path: Path, dtype: str, arch: str = "llama") -> Path:
    """A magnitude-pruned checkpoint whose layers have 60 or 120 inputs: not multiples of 8."""
    out = tmp_path / f"pruned-{arch}-{dtype}"
    sparseft.prune(
        str(make_model_dir(arch, hidden=60)),
        out,
        method="magnitude",
        sparsity=0.7,
        dtype=dtype,
        progress=False,
    )
    return out


def bits_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the state dict as raw bytes, so that equality is bit-for-bit (-0.0 and NaN included)."""
    return {k: v.detach().contiguous().view(torch.uint8) for k, v in model.state_dict().items()}


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def tiny_t5(path: Path) -> Path:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, decoder_start_token_id=0
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    return path


def save_t5(path: Path, tokenizer: transformers.PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    transformers.T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_whisper(path: Path, tokenizer: transformers.PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
        max_source_positions=WHISPER_SECONDS * 50, max_target_positions=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    transformers.WhisperForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    extractor = transformers.WhisperFeatureExtractor(
        feature_size=16, sampling_rate=RATE, hop_length=160, chunk_length=WHISPER_SECONDS
    )
    extractor.save_pretrained(path)
    return path


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))


def write_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """`{"translation": {"en": ..., "de": ...}}` records; the "German" is the English words reversed."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            en = sentence(rng)
            f.write(json.dumps({"translation": {"en": en, "de": " ".join(reversed(en.split()))}}) + "\n")
    return path


def tone(seconds: float, freq: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(int(freq)).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def write_speech(folder: Path, n: int, rate: int = RATE, seed: int = 0) -> Path:
    """`n` clips of tones (wav and flac, at `rate`) listed in speech.jsonl with made-up transcripts; relative
    paths, as a dataset folder would hold them."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "speech.jsonl").open("w") as f:
        for i in range(n):
            name = f"clip{i}.{'wav' if i % 2 else 'flac'}"
            soundfile.write(folder / name, tone(rng.uniform(0.5, 1.5), 200 + 50 * i, rate), rate)
            f.write(json.dumps({"audio": name, "text": sentence(rng)}) + "\n")
    return folder / "speech.jsonl"


def encoding(model_dir: Path, source: PairSource, max_tokens: int = 64) -> Encoding:
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    return Encoding.for_model(str(model_dir), tok, source, max_tokens)
