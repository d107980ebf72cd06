"""Datasets for calibration and perplexity: load texts from a local file or the `datasets` hub, tokenize, window."""

from __future__ import annotations

import csv
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from sparseft.errors import SparseftError, first_line

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextSource:
    """Where text comes from: a local file or a `datasets` name, with its config, split and text column."""

    dataset: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    def describe(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "text_field": self.text_field,
        }


def is_local(dataset: str) -> bool:
    return Path(dataset).suffix in LOCAL_FORMATS or Path(dataset).exists() or dataset.startswith((".", "/"))


def check_local(dataset: str) -> None:
    """Fail fast, before any model is loaded, on a local dataset path that cannot be read."""
    if is_local(dataset):
        path = Path(dataset).expanduser()
        if path.is_dir():
            raise SparseftError(f"dataset {dataset} is a directory; pass one data file (e.g. train.jsonl)")
        if not path.is_file():
            raise SparseftError(f"dataset file {dataset} does not exist")
        if path.suffix not in LOCAL_FORMATS:
            raise SparseftError(f"cannot read {dataset}: use one of {', '.join(sorted(LOCAL_FORMATS))}")


def load_records(dataset: str, config: str | None = None, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local file (txt/jsonl/json/csv/parquet) or a hub name."""
    import datasets

    check_local(dataset)
    if is_local(dataset):
        path = Path(dataset).expanduser()
        if path.suffix == ".txt":
            # One record for the whole file: line-by-line records would lose paragraph structure.
            return datasets.Dataset.from_dict({"text": [path.read_text(encoding="utf-8", errors="replace")]})
        try:
            if path.suffix == ".parquet":  # typed columns: read as stored
                return datasets.load_dataset("parquet", data_files=str(path), split="train")
            return _table(_csv_records(path) if path.suffix == ".csv" else _json_records(path))
        except (ValueError, UnicodeDecodeError, csv.Error, SparseftError) as e:
            raise SparseftError(f"cannot parse {dataset} as {path.suffix[1:]}: {first_line(e)}") from e
        except Exception as e:  # datasets and pyarrow raise many types for malformed files
            raise SparseftError(f"cannot read {dataset}: {first_line(e)}") from e
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, unknown name, unknown config or split
        raise SparseftError(
            f"cannot load dataset {dataset!r} (config {config}, split {split}): {first_line(e)}; without network "
            "access, pass a local .txt/.jsonl/.json/.csv/.parquet file as --dataset"
        ) from e


# Local JSON and CSV files are read with the standard library, every text value as written: datasets' readers infer
# a type per column (Arrow, pandas), which turns an answer of 12 into "12.0", 007 into 7 and "NA" into null. The
# records go into Arrow a chunk at a time, so a large file is held once, as a table, not as Python objects.
_CHUNK = 10_000


class _Number(str):
    """A JSON number, as written."""


def _field(value: Any, top: bool) -> Any:
    """A record's field: a number is text at the top level (a field that is read as text) and a number inside
    (an inline audio array, its sampling rate)."""
    if isinstance(value, _Number):
        return str(value) if top else (float(value) if any(c in value for c in ".eE") else int(value))
    if isinstance(value, list):
        return [_field(v, False) for v in value]
    if isinstance(value, dict):
        return {k: _field(v, False) for k, v in value.items()}
    return value


def _record(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SparseftError(f"{where} is a {type(value).__name__}, not a record of fields")
    return {k: _field(v, True) for k, v in value.items()}


def _table(records: Iterable[dict[str, Any]]) -> Any:
    """A datasets.Dataset of the records; a field missing from a record is null there."""
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

    tables, chunk = [], []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            tables.append(_chunk_table(chunk))
            chunk = []
    if chunk:
        tables.append(_chunk_table(chunk))
    if not tables:
        raise SparseftError("the file holds no records")
    return datasets.Dataset(InMemoryTable(pa.concat_tables(tables, promote_options="default")))


def _chunk_table(chunk: list[dict[str, Any]]) -> Any:
    import pyarrow as pa

    names = list(dict.fromkeys(name for record in chunk for name in record))
    return pa.table({name: [record.get(name) for record in chunk] for name in names})


def _json_records(path: Path) -> Iterator[dict[str, Any]]:
    load = functools.partial(json.loads, parse_int=_Number, parse_float=_Number)
    if path.suffix == ".json":
        try:  # one JSON document: a list of records, a mapping of columns, or one record
            data = load(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            whole: json.JSONDecodeError | None = e  # or JSON lines under a .json name
        else:
            if isinstance(data, list):
                yield from (_record(r, f"record {i + 1}") for i, r in enumerate(data))
                return
            if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
                if len({len(v) for v in data.values()}) != 1:
                    raise SparseftError("its columns (a mapping of lists) are of different lengths")
                names = list(data)
                yield from (
                    _record(dict(zip(names, row, strict=True)), "a row")
                    for row in zip(*data.values(), strict=True)
                )
                return
            yield _record(data, "the document")
            return
    else:
        whole = None
    with path.open(encoding="utf-8-sig") as f:  # lines split at "\n" only: JSON strings may hold U+2028
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield _record(load(line), f"line {number}")
                except json.JSONDecodeError as e:
                    problem = f"{whole}" if whole is not None and number == 1 else f"line {number}: {e}"
                    raise SparseftError(problem) from None


def _csv_records(path: Path) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(2**31 - 1)  # a long document in one cell; the default stops at 128 KiB
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise SparseftError("the file has no header row naming its columns")
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise SparseftError(
                f"the header names {', '.join(repeated)} more than once; give each column its own name"
            )
        for row in reader:
            if not row:
                continue  # a blank line
            if len(row) > len(header):
                raise SparseftError(f"line {reader.line_num} has {len(row)} fields, the header {len(header)}")
            # an empty or missing cell is a missing value
            yield {
                name: (value or None)
                for name, value in zip(header, row + [""] * (len(header) - len(row)), strict=True)
            }


def _check_field(source: TextSource, fields: list[str]) -> None:
    if source.text_field not in fields:
        raise SparseftError(
            f"dataset {source.dataset} has no field {source.text_field!r}; its fields are "
            f"{', '.join(fields)} (choose one with --text-field)"
        )


def load_texts(source: TextSource) -> list[str]:
    records = load_records(source.dataset, source.config, source.split)
    _check_field(source, records.column_names)
    texts = [t for t in records[source.text_field] if isinstance(t, str)]
    if not any(t.strip() for t in texts):
        raise SparseftError(f"dataset {source.dataset} field {source.text_field!r} holds no text")
    return texts


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts joined by blank lines and tokenized once, as in the usual perplexity protocol."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def random_windows(stream: torch.Tensor, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens at random offsets (seeded), shape (num_samples, seqlen)."""
    if num_samples < 1:
        raise SparseftError(f"num_samples must be at least 1, got {num_samples}")
    if stream.numel() < seqlen:
        raise SparseftError(
            f"the calibration text has {stream.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            "use more text or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (num_samples,), generator=gen)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def calibration_samples(
    tokenizer: Any, source: TextSource, num_samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens from random places in the source's text (seeded), shape
    (num_samples, seqlen). A local .txt file is read piece by piece, never whole; other sources are read as
    records and joined by blank lines (see `sample_windows` for how little of either is tokenized)."""
    check_local(source.dataset)
    path = Path(source.dataset).expanduser()
    text: Text
    if is_local(source.dataset) and path.suffix == ".txt":
        _check_field(source, ["text"])  # a text file is one record of one field, as `load_records` reads it
        text = FileText(path)
    else:
        text = JoinedTexts(load_texts(source))
    return sample_windows(tokenizer, text, num_samples, seqlen, seed)


# --- calibration windows without tokenizing the whole text ------------------------------------------------------
# Tokenizing a whole calibration text to cut a few windows from it costs time and memory in proportion to the
# text (token ids, offsets and byte strings per token), so a large text is never tokenized whole: each window
# is tokenized from a piece of text read at a random offset. A text no longer than those pieces together is
# tokenized whole, as the pieces would cover most of it anyway.

# The first guess at how much text a window needs, in characters (bytes of a file) per token: more than most
# tokenizers take, so that one piece usually suffices; a piece that tokenizes short is read again twice as long.
CHARS_PER_TOKEN = 6
_SPACE = re.compile(r"\s")
_LAST_SPACE = re.compile(r"\s\S*\Z")


class Text(Protocol):
    """Text that can be read in pieces: `size` positions (characters of a string, bytes of a file)."""

    size: int

    def read(self, start: int, length: int) -> str: ...

    def whole(self) -> str: ...


class FileText:
    """A UTF-8 text file, read at byte offsets. A piece cut inside a character starts or ends with U+FFFD, which
    the whitespace alignment of `sample_windows` drops."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = path.stat().st_size

    def read(self, start: int, length: int) -> str:
        with self.path.open("rb") as f:
            f.seek(start)
            return f.read(length).decode("utf-8", errors="replace")

    def whole(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


class JoinedTexts:
    """Texts (records) joined by blank lines, as `token_stream` joins them."""

    def __init__(self, texts: list[str]) -> None:
        self.text = "\n\n".join(texts)
        self.size = len(self.text)

    def read(self, start: int, length: int) -> str:
        return self.text[start : start + length]

    def whole(self) -> str:
        return self.text


def sample_windows(tokenizer: Any, text: Text, num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`num_samples` windows of `seqlen` tokens at random places of `text` (seeded), shape (num_samples, seqlen).

    A text of at most `num_samples` pieces is tokenized whole and cut by `random_windows`. From a larger one, each
    window is the first `seqlen` tokens of a piece read at a random position, trimmed to whole words (from its first
    whitespace to its last) so that its tokens are those of the running text, except near the cuts."""
    if num_samples < 1:
        raise SparseftError(f"num_samples must be at least 1, got {num_samples}")
    length = seqlen * CHARS_PER_TOKEN
    if text.size <= num_samples * length:
        return random_windows(token_stream(tokenizer, [text.whole()]), num_samples, seqlen, seed)
    generator = torch.Generator().manual_seed(seed)
    places = torch.rand(num_samples, generator=generator, dtype=torch.float64).tolist()
    windows = []
    for place in places:
        while True:
            start = int(place * (text.size - length))
            ids = _piece_ids(tokenizer, text.read(start, length), start > 0)
            if len(ids) >= seqlen:
                break
            length *= 2  # and for the windows after this one: the text takes more characters per token
            if length >= text.size:  # too little text per token for windows of this size: the whole text
                return random_windows(token_stream(tokenizer, [text.whole()]), num_samples, seqlen, seed)
        windows.append(ids[:seqlen])
    return torch.tensor(windows, dtype=torch.long)


def _piece_ids(tokenizer: Any, piece: str, cut_start: bool) -> list[int]:
    """Token ids of the whole words of a piece cut from a longer text (at its start where `cut_start`): a word cut
    in two tokenizes otherwise than in the running text."""
    first = _SPACE.search(piece) if cut_start else None
    last = _LAST_SPACE.search(piece)
    begin = first.start() if first is not None else 0
    end = last.start() if last is not None and last.start() > begin else len(piece)
    ids: list[int] = tokenizer(piece[begin:end], add_special_tokens=False, verbose=False)["input_ids"]
    return ids
