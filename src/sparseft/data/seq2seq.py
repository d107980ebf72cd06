"""Encoder-decoder data: translation pairs (T5) and speech (Whisper) as model inputs with labels.

An example is the encoder's input (source token ids, or log-mel features from the model's own feature
extractor) and the target token ids as labels. The decoder reads the labels shifted right behind the
model's decoder start token, so `decoder_input_ids[t]` is the token before `labels[t]` and logits, labels and
decoder hidden states line up position by position (what `sparseft.finetuning.losses` expects). Examples are
batched by `sparseft.data.batch.collate`.

Sources: a local jsonl/csv/json/parquet file or a `datasets` name.
- Translation: `{"translation": {"de": ..., "en": ...}}` records (WMT14 "de-en") or columns named by the
  languages, chosen with `source_lang`/`target_lang`; else the `source_field`/`target_field` columns. T5 reads a
  task prefix before the source ("translate English to German: "), added by default for its languages.
- Speech: the `audio_field` column holds a file path (relative paths from the data file's folder), or a
  `datasets` Audio value; `text_field` holds the transcript; `target_lang` (optional) is the language a
  multilingual Whisper transcribes in (its labels then start with <|lang|><|transcribe|>). Audio is decoded with soundfile (wav, flac, ogg,
  ...), mixed to mono and resampled to the feature extractor's rate with a polyphase filter.
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import soundfile
import torch
import transformers
from pydantic import BaseModel

from sparseft.data.records import check_local, is_local, load_records
from sparseft.errors import SparseftError, SparseftWarning, first_line
from sparseft.hf import model_kind, read_config

Kind = Literal["causal", "translation", "speech"]
SEQ2SEQ_FORMATS = ("translation", "speech")
# The languages of T5's pretraining translation tasks, by code, as its task prefixes name them.
T5_LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


# --- which kind of model, and how to load it -------------------------------------------------------------------


def load_feature_extractor(name_or_path: str, trust_remote_code: bool = False) -> Any:
    try:
        extractor = transformers.AutoFeatureExtractor.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as e:
        raise SparseftError(
            f"cannot load a feature extractor from {name_or_path}: save one beside the model "
            "(feature_extractor.save_pretrained)"
        ) from e
    check_rate(getattr(extractor, "sampling_rate", None), f"the feature extractor of {name_or_path}")
    return extractor


# --- where examples come from ----------------------------------------------------------------------------------


class PairFields(BaseModel):
    """Where encoder-decoder examples sit in a dataset (see this module's docstring): translation records
    `{"translation": {lang: text}}` or columns, chosen by language or by field name, with T5's task prefix
    (None: its own for the languages); speech audio in `audio_field`, its transcript in `text_field`."""

    source_lang: str | None = None
    target_lang: str | None = None
    source_field: str = "source"
    target_field: str = "target"
    source_prefix: str | None = None
    audio_field: str = "audio"


@dataclass(frozen=True)
class PairSource:
    """Where encoder-decoder examples come from: a dataset and the fields of its two sides."""

    dataset: str
    config: str | None = None
    split: str = "train"
    source_lang: str | None = None
    target_lang: str | None = None
    source_field: str = "source"
    target_field: str = "target"
    source_prefix: str | None = (
        None  # None: T5's own task prefix when the model is T5 and knows both languages
    )
    audio_field: str = "audio"
    text_field: str = "text"  # the transcript of speech

    @classmethod
    def from_config(cls, cfg: Any) -> PairSource:
        """From a `PruneConfig` or `DataConfig` (both carry these fields)."""
        return cls(
            dataset=cfg.dataset,
            config=cfg.dataset_config,
            split=cfg.split,
            source_lang=cfg.source_lang,
            target_lang=cfg.target_lang,
            source_field=cfg.source_field,
            target_field=cfg.target_field,
            source_prefix=cfg.source_prefix,
            audio_field=cfg.audio_field,
            text_field=cfg.text_field,
        )

    def describe(self, kind: Kind) -> dict[str, Any]:
        where = {"dataset": self.dataset, "config": self.config, "split": self.split}
        if kind == "speech":
            return {
                **where,
                "audio_field": self.audio_field,
                "text_field": self.text_field,
                "language": self.target_lang,
            }
        if self.source_lang or self.target_lang:
            return {**where, "source_lang": self.source_lang, "target_lang": self.target_lang}
        return {**where, "source_field": self.source_field, "target_field": self.target_field}

    def prefix(self, model_type: str) -> str:
        if self.source_prefix is not None:
            return self.source_prefix
        names = (T5_LANGUAGES.get(self.source_lang or ""), T5_LANGUAGES.get(self.target_lang or ""))
        if model_type == "t5" and all(names):
            return f"translate {names[0]} to {names[1]}: "
        return ""


def translation_pairs(records: Any, source: PairSource) -> list[tuple[str, str]]:
    """(source text, target text) of every record; a missing language or field is one clear error."""
    columns = records.column_names
    if source.source_lang or source.target_lang:
        if not (source.source_lang and source.target_lang):
            raise SparseftError("translation needs both --source-lang and --target-lang (e.g. en and de)")
        langs = (source.source_lang, source.target_lang)
        if "translation" in columns:
            pairs = []
            for i, record in enumerate(records["translation"]):
                missing = [lang for lang in langs if not isinstance(record, dict) or lang not in record]
                if missing:
                    have = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
                    raise SparseftError(
                        f"record {i} of {source.dataset} has no {missing[0]!r} translation (it has {have}); "
                        "choose the pair with --source-lang/--target-lang or --dataset-config (e.g. de-en)"
                    )
                pairs.append(
                    (
                        _text(record[langs[0]], i, langs[0], source),
                        _text(record[langs[1]], i, langs[1], source),
                    )
                )
            return pairs
        fields = langs
    else:
        fields = (source.source_field, source.target_field)
    missing = [f for f in fields if f not in columns]
    if missing:
        raise SparseftError(
            f"dataset {source.dataset} has no field {missing[0]!r}; its fields are {', '.join(columns)} "
            "(choose with --source-field/--target-field, or --source-lang/--target-lang for translation records)"
        )
    return [
        (_text(s, i, fields[0], source), _text(t, i, fields[1], source))
        for i, (s, t) in enumerate(zip(records[fields[0]], records[fields[1]], strict=True))
    ]


def _text(value: Any, record: int, field: str, source: Any) -> str:
    """A record's text field; a null one would otherwise be trained and scored as the text "None"."""
    if value is None:
        raise SparseftError(
            f"record {record} of {source.dataset} has no value (null) in {field!r}; fill it in or drop the record"
        )
    return str(value)


# --- audio ---------------------------------------------------------------------------------------------------


def check_rate(rate: Any, what: str) -> int:
    """A sampling rate as a positive whole number of Hz, or one clear error."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or rate <= 0 or rate != int(rate):
        raise SparseftError(
            f"{what} has sampling rate {rate!r}; it must be a positive whole number of Hz (e.g. 16000)"
        )
    return int(rate)


def decode_audio(data: str | Path | bytes, name: str) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sampling rate of an audio file (a path, or its bytes)."""
    try:
        samples, rate = soundfile.read(
            io.BytesIO(data) if isinstance(data, bytes) else str(data), dtype="float32", always_2d=True
        )
    except (RuntimeError, OSError, ValueError, TypeError) as e:  # soundfile.LibsndfileError is a RuntimeError
        reason = first_line(e)
        raise SparseftError(
            f"cannot decode audio {name}: {reason}; give wav, flac or ogg files (mp3 needs libsndfile >= 1.1)"
        ) from e
    if samples.shape[0] == 0:
        raise SparseftError(f"audio {name} holds no samples")
    return samples.mean(axis=1), int(rate)


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """`samples` at `rate` Hz resampled to `target` Hz (polyphase filter; exact for whole-number rates)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    from scipy.signal import resample_poly  # imported on first use: slow to import, and rarely needed

    g = math.gcd(rate, target)
    return resample_poly(samples, target // g, rate // g).astype(np.float32)


def read_audio(value: Any, base: Path, rate: int, name: str) -> np.ndarray:
    """One record's audio at `rate` Hz: a file path, a `datasets` Audio value (`array` + `sampling_rate`, or
    undecoded `bytes`/`path`), or a plain list of samples is not enough (it has no rate) and is refused."""
    if isinstance(value, dict):
        if value.get("array") is not None:
            source_rate = check_rate(value.get("sampling_rate"), f"audio {name}")
            samples = np.asarray(value["array"], dtype=np.float32)
            if samples.ndim > 1:  # (channels, samples) as datasets decodes multi-channel audio
                samples = samples.mean(axis=0)
            return resample(samples, source_rate, rate)
        if value.get("bytes"):
            samples, source_rate = decode_audio(value["bytes"], str(value.get("path") or name))
            return resample(samples, check_rate(source_rate, f"audio {name}"), rate)
        value = value.get("path")
    if not isinstance(value, (str, Path)) or not str(value):
        raise SparseftError(
            f"audio {name} is {type(value).__name__}, not a file path or a datasets Audio value"
        )
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise SparseftError(f"audio file {path} (from {name}) does not exist")
    samples, source_rate = decode_audio(path, str(path))
    return resample(samples, check_rate(source_rate, f"audio {path}"), rate)


# --- examples -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One encoder-decoder example. `input_features`: (mel bins, frames) for speech, else None; `target` is
    the reference text (BLEU and WER score against it, not against the decoded labels)."""

    labels: list[int]
    decoder_input_ids: list[int]
    input_ids: list[int] | None = None
    input_features: torch.Tensor | None = None
    target: str = ""


@dataclass(frozen=True)
class Encoding:
    """How one model wants its examples: tokenizer, feature extractor (speech), decoder start token, the task
    prefix of its sources, and length limits in tokens."""

    kind: Kind
    tokenizer: Any
    decoder_start: int
    feature_extractor: Any = None
    prefix: str = ""
    max_source_tokens: int = 512
    max_target_tokens: int = 512

    @classmethod
    def for_model(
        cls,
        name_or_path: str,
        tokenizer: Any,
        source: PairSource,
        max_tokens: int,
        trust_remote_code: bool = False,
        config: Any = None,
    ) -> Encoding:
        config = config or read_config(name_or_path, trust_remote_code)
        kind = model_kind(config)
        if kind == "causal":
            raise SparseftError(f"{name_or_path} is not an encoder-decoder model; use text data for it")
        start = getattr(config, "decoder_start_token_id", None)
        if start is None:
            raise SparseftError(f"the config of {name_or_path} sets no decoder_start_token_id")
        limit = getattr(config, "max_target_positions", None) or max_tokens
        extractor = load_feature_extractor(name_or_path, trust_remote_code) if kind == "speech" else None
        if kind == "speech" and source.target_lang and hasattr(tokenizer, "set_prefix_tokens"):
            # Whisper's labels name the language and task: <|startoftranscript|><|hi|><|transcribe|>...
            tokenizer.set_prefix_tokens(language=source.target_lang, task="transcribe")
        return cls(
            kind,
            tokenizer,
            int(start),
            extractor,
            source.prefix(config.model_type) if kind == "translation" else "",
            max_tokens,
            min(max_tokens, int(limit)),
        )

    def token_ids(self, text: str, limit: int) -> list[int]:
        """Token ids ending in EOS (added when the tokenizer does not), at most `limit` of them."""
        ids = list(self.tokenizer(text, verbose=False)["input_ids"])
        eos = self.tokenizer.eos_token_id
        if ids and ids[0] == self.decoder_start and self.kind == "speech":
            # Whisper's tokenizer starts with <|startoftranscript|>, the token the decoder is started with.
            ids = ids[1:]
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if len(ids) > limit:
            ids = ids[: limit - 1] + ([eos] if eos is not None else ids[limit - 1 : limit])
        return ids

    def example(self, source: str | np.ndarray, target: str) -> Example:
        labels = self.token_ids(target, self.max_target_tokens)
        decoder_input_ids = [self.decoder_start, *labels[:-1]]
        if self.kind == "speech":
            assert isinstance(source, np.ndarray)
            features = self.features([source])[0]
            return Example(labels, decoder_input_ids, input_features=features, target=target)
        assert isinstance(source, str)
        input_ids = self.token_ids(self.prefix + source, self.max_source_tokens)
        return Example(labels, decoder_input_ids, input_ids=input_ids, target=target)

    def features(self, audio: list[np.ndarray]) -> torch.Tensor:
        """Log-mel features of audio at the extractor's rate, (batch, mel bins, frames); Whisper pads or cuts
        every clip to its 30 s window."""
        rate = self.feature_extractor.sampling_rate
        try:
            out = self.feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
        except ValueError as e:
            raise SparseftError(f"the feature extractor refuses the audio: {first_line(e)}") from e
        return out["input_features"].float()


def load_examples(
    source: PairSource, encoding: Encoding, limit: int | None = None, seed: int | None = None
) -> list[Example]:
    """Examples of `source`; with `seed`, `limit` records drawn at random, else the first `limit` records."""
    check_local(source.dataset)
    records = load_records(source.dataset, source.config, source.split)
    if len(records) == 0:
        raise SparseftError(f"dataset {source.dataset} (split {source.split}) has no records")
    if limit is not None and limit < len(records):
        order = random.Random(seed).sample(range(len(records)), limit) if seed is not None else range(limit)
        records = records.select(order)
    if encoding.kind == "translation":
        return [encoding.example(s, t) for s, t in translation_pairs(records, source)]
    pairs = speech_pairs(records, source, encoding)
    window = getattr(encoding.feature_extractor, "n_samples", None)  # Whisper's 30 s
    longer = sum(len(audio) > window for audio, _ in pairs) if isinstance(window, int) else 0
    if longer:
        seconds = window / encoding.feature_extractor.sampling_rate
        warnings.warn(
            f"{longer} of {len(pairs)} clips of {source.dataset} are longer than the model's {seconds:g} s window: "
            "it hears only their start while their whole transcript is the target; split long clips",
            SparseftWarning,
            stacklevel=2,
        )
    return [encoding.example(audio, text) for audio, text in pairs]


def speech_pairs(records: Any, source: PairSource, encoding: Encoding) -> list[tuple[np.ndarray, str]]:
    """(audio at the extractor's rate, transcript) of every record."""
    import datasets  # imported on first use, as in `sparseft.data.records`

    missing = [f for f in (source.audio_field, source.text_field) if f not in records.column_names]
    if missing:
        raise SparseftError(
            f"dataset {source.dataset} has no field {missing[0]!r}; its fields are "
            f"{', '.join(records.column_names)} (choose with --audio-field / --text-field)"
        )
    if isinstance(records.features[source.audio_field], datasets.Audio):
        # Undecoded bytes: decoding here (soundfile) avoids datasets' optional torchcodec dependency.
        records = records.cast_column(source.audio_field, datasets.Audio(decode=False))
    base = Path(source.dataset).expanduser().parent if is_local(source.dataset) else Path.cwd()
    rate = encoding.feature_extractor.sampling_rate
    return [
        (
            read_audio(r[source.audio_field], base, rate, f"{source.audio_field} of record {i}"),
            _text(r[source.text_field], i, source.text_field, source),
        )
        for i, r in enumerate(records)
    ]


def save_feature_extractor(model: str, config: Any, directory: Path, trust_remote_code: bool = False) -> None:
    """Copy a speech model's feature extractor beside its pruned weights, so the output loads as a whole."""
    if model_kind(config) == "speech":
        load_feature_extractor(model, trust_remote_code).save_pretrained(directory)


def finetune_examples(model: str, tokenizer: Any, cfg: Any, trust_remote_code: bool = False) -> list[Example]:
    """Training examples for an encoder-decoder from a `DataConfig` of format "translation" or "speech"
    (seqlen caps the tokens of each side, max_examples the records)."""
    source = PairSource.from_config(cfg)
    encoding = Encoding.for_model(model, tokenizer, source, cfg.seqlen, trust_remote_code)
    if encoding.kind != cfg.format:
        raise SparseftError(f"data format is {cfg.format!r} but {model} is a {encoding.kind} model")
    return load_examples(source, encoding, cfg.max_examples)
