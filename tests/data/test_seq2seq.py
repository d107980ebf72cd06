"""Translation and speech data for encoder-decoder models, on the tiny T5 / Whisper and synthetic data of
tests/helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import transformers

from sparseft.data.batch import collate
from sparseft.data.seq2seq import PairSource, check_rate, load_examples, read_audio, resample
from sparseft.errors import SparseftError
from sparseft.hf import model_class, model_kind
from tests.helpers import encoding, save_whisper, tone, write_pairs, write_speech

RATE = 16_000
WORDS = ["cat", "dog", "house", "tree", "red", "blue", "small", "big", "runs", "sleeps", "the", "a"]
WHISPER_SECONDS = 2  # the tiny Whisper's window: 2 s of 16 kHz audio, 200 frames of 16 mel bins


def test_kinds_and_auto_classes(t5_dir: Path, whisper_dir: Path) -> None:
    t5 = transformers.AutoConfig.from_pretrained(t5_dir)
    whisper = transformers.AutoConfig.from_pretrained(whisper_dir)
    assert (model_kind(t5), model_kind(whisper)) == ("translation", "speech")
    assert model_kind(transformers.GPT2Config()) == "causal"
    assert isinstance(
        model_class(whisper).from_pretrained(whisper_dir), transformers.WhisperForConditionalGeneration
    )
    assert isinstance(model_class(t5).from_pretrained(t5_dir), transformers.T5ForConditionalGeneration)


def test_translation_examples_have_prefix_labels_and_shifted_decoder_inputs(
    t5_dir: Path, tmp_path: Path
) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 6)
    source = PairSource(str(data), source_lang="en", target_lang="de")
    enc = encoding(t5_dir, source)
    assert enc.prefix == "translate English to German: "
    examples = load_examples(source, enc)
    first = json.loads(data.read_text().splitlines()[0])["translation"]
    tok = enc.tokenizer
    assert tok.decode(examples[0].input_ids, skip_special_tokens=True) == enc.prefix + first["en"]
    assert tok.decode(examples[0].labels, skip_special_tokens=True) == first["de"]
    for e in examples:
        assert e.labels[-1] == tok.eos_token_id
        assert e.decoder_input_ids == [enc.decoder_start, *e.labels[:-1]]

    reverse = PairSource(str(data), source_lang="de", target_lang="en", source_prefix="")
    back = load_examples(reverse, encoding(t5_dir, reverse))
    assert tok.decode(back[0].labels, skip_special_tokens=True) == first["en"]


def test_translation_from_named_columns(t5_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("src,tgt\nthe red cat,die rote Katze\na dog,ein Hund\n")
    source = PairSource(str(path), source_field="src", target_field="tgt")
    examples = load_examples(source, encoding(t5_dir, source))
    assert len(examples) == 2
    assert examples[1].input_ids is not None


def test_a_null_text_is_refused_with_its_record(t5_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"src": "a dog", "tgt": "ein Hund"}\n{"src": "a cat", "tgt": null}\n')
    source = PairSource(str(path), source_field="src", target_field="tgt")
    with pytest.raises(SparseftError, match=r"record 1 of .*pairs\.jsonl has no value \(null\) in 'tgt'"):
        load_examples(source, encoding(t5_dir, source))


def test_speech_examples_from_wav_and_flac_at_other_rates(whisper_dir: Path, tmp_path: Path) -> None:
    data = write_speech(tmp_path / "speech", 4, rate=22_050)
    source = PairSource(str(data))
    enc = encoding(whisper_dir, source)
    examples = load_examples(source, enc)
    assert len(examples) == 4
    features = examples[0].input_features
    assert features is not None and features.shape == (16, WHISPER_SECONDS * 100)
    # The same clip given at 16 kHz gives the same features as the 22.05 kHz file resampled.
    record = json.loads(data.read_text().splitlines()[0])
    samples, rate = soundfile.read(data.parent / record["audio"], dtype="float32")
    direct = enc.features([resample(samples, rate, RATE)])[0]
    torch.testing.assert_close(features, direct)
    assert enc.tokenizer.decode(examples[0].labels, skip_special_tokens=True) == record["text"]
    batch = collate(examples, 0)
    assert batch["input_features"].shape == (4, 16, WHISPER_SECONDS * 100)
    assert "attention_mask" not in batch  # Whisper's encoder reads its whole fixed window


def test_resample_keeps_a_tone() -> None:
    out = resample(tone(1.0, 440, 44_100), 44_100, RATE)
    assert out.shape == (RATE,)
    spectrum = np.abs(np.fft.rfft(out))
    assert np.argmax(spectrum) == 440  # 1 s of audio: bin k is k Hz


def test_datasets_audio_values(whisper_dir: Path, tmp_path: Path) -> None:
    enc = encoding(whisper_dir, PairSource("x.jsonl"))
    decoded = {"array": tone(0.5, 300, 8_000), "sampling_rate": 8_000}
    out = read_audio(decoded, tmp_path, RATE, "record 0")
    assert out.shape == (RATE // 2,)
    path = tmp_path / "a.wav"
    soundfile.write(path, tone(0.5, 300, 8_000), 8_000)
    undecoded = {"bytes": path.read_bytes(), "path": "a.wav"}
    np.testing.assert_allclose(read_audio(undecoded, tmp_path, RATE, "record 0"), out, atol=1e-4)
    assert enc.features([out]).shape == (1, 16, WHISPER_SECONDS * 100)


def test_limit_draws_records_with_a_seed(t5_dir: Path, tmp_path: Path) -> None:
    source = PairSource(str(write_pairs(tmp_path / "p.jsonl", 20)), source_lang="en", target_lang="de")
    enc = encoding(t5_dir, source)
    a, b = load_examples(source, enc, 5, seed=1), load_examples(source, enc, 5, seed=2)
    assert len(a) == 5 and [e.input_ids for e in a] != [e.input_ids for e in b]
    assert [e.input_ids for e in load_examples(source, enc, 5)] == [
        e.input_ids for e in load_examples(source, enc)[:5]
    ]


def test_long_sides_are_cut_and_keep_eos(t5_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"source": " ".join(WORDS * 5), "target": " ".join(WORDS * 5)}) + "\n")
    source = PairSource(str(path))
    enc = encoding(t5_dir, source, max_tokens=10)
    (example,) = load_examples(source, enc)
    assert len(example.labels) == len(example.input_ids or []) == 10
    assert example.labels[-1] == enc.tokenizer.eos_token_id


def test_missing_language_pair_field(t5_dir: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 3)
    source = PairSource(str(data), source_lang="en", target_lang="fr")
    with pytest.raises(SparseftError, match="no 'fr' translation"):
        load_examples(source, encoding(t5_dir, source))
    only_one = PairSource(str(data), source_lang="en")
    with pytest.raises(SparseftError, match="both --source-lang and --target-lang"):
        load_examples(only_one, encoding(t5_dir, only_one))
    columns = PairSource(str(data))  # no source/target columns in translation records
    with pytest.raises(SparseftError, match="no field 'source'.*translation"):
        load_examples(columns, encoding(t5_dir, columns))


def test_audio_that_cannot_be_decoded(whisper_dir: Path, tmp_path: Path) -> None:
    data = write_speech(tmp_path / "s", 2)
    (data.parent / "clip1.wav").write_bytes(b"RIFF not really a wave file")
    source = PairSource(str(data))
    with pytest.raises(SparseftError, match=r"cannot decode audio .*clip1\.wav"):
        load_examples(source, encoding(whisper_dir, source))
    (data.parent / "clip1.wav").unlink()
    with pytest.raises(SparseftError, match=r"clip1\.wav .*does not exist"):
        load_examples(source, encoding(whisper_dir, source))


def test_sampling_rates_the_extractor_cannot_take(whisper_dir: Path, tmp_path: Path) -> None:
    for rate in (0, -16000, 22050.5, None):
        with pytest.raises(SparseftError, match="positive whole number of Hz"):
            read_audio({"array": tone(0.1, 300), "sampling_rate": rate}, tmp_path, RATE, "record 3")
    assert check_rate(16000.0, "x") == 16000
    broken = tmp_path / "broken"
    save_whisper(broken, transformers.AutoTokenizer.from_pretrained(whisper_dir))
    config = json.loads((broken / "preprocessor_config.json").read_text())
    (broken / "preprocessor_config.json").write_text(json.dumps({**config, "sampling_rate": 0}))
    with pytest.raises(SparseftError, match="feature extractor .* sampling rate 0"):
        encoding(broken, PairSource("x.jsonl"))


def test_speech_needs_a_feature_extractor(whisper_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    save_whisper(bare, transformers.AutoTokenizer.from_pretrained(whisper_dir))
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(SparseftError, match="feature extractor"):
        encoding(bare, PairSource("x.jsonl"))


def test_causal_models_are_refused(make_model_dir, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SparseftError, match="not an encoder-decoder"):
        encoding(make_model_dir("gpt2"), PairSource("x.jsonl"))


def test_clips_longer_than_the_window_are_counted_in_a_warning(whisper_dir: Path, tmp_path: Path) -> None:
    from sparseft.errors import SparseftWarning

    data = write_speech(tmp_path / "speech", 3)  # 0.5-1.5 s clips: inside the tiny Whisper's 2 s window
    soundfile.write(data.parent / "long.wav", tone(WHISPER_SECONDS + 1.0, 300, RATE), RATE)
    with data.open("a") as f:
        f.write(json.dumps({"audio": "long.wav", "text": "a long clip"}) + "\n")
    source = PairSource(str(data))
    with pytest.warns(SparseftWarning, match=r"1 of 4 clips of .* longer than the model's 2 s window"):
        assert len(load_examples(source, encoding(whisper_dir, source))) == 4
