"""Datasets for calibration and perplexity: load texts from a local file or the `datasets` hub, tokenize, window."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseft.errors import SparseftError

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
            return datasets.Dataset.from_dict(_read_csv(path) if path.suffix == ".csv" else _read_json(path))
        except (ValueError, UnicodeDecodeError, csv.Error, SparseftError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SparseftError(f"cannot parse {dataset} as {path.suffix[1:]}: {reason}") from e
        except Exception as e:  # datasets and pyarrow raise many types for malformed files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SparseftError(f"cannot read {dataset}: {reason}") from e
    try:
        return datasets.load_dataset(dataset, config, split=split)
    except Exception as e:  # network, unknown name, unknown config or split
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SparseftError(
            f"cannot load dataset {dataset!r} (config {config}, split {split}): {reason}; without network access, "
            "pass a local .txt/.jsonl/.json/.csv/.parquet file as --dataset"
        ) from e


# Local JSON and CSV files are read with the standard library, every value as written: datasets' readers infer a
# type per column (Arrow, pandas), which turns an answer of 12 into "12.0", 007 into 7 and "NA" into null.


def _columns(records: list[Any], what: str) -> dict[str, list[Any]]:
    """Records (mappings) as columns; a field missing from a record is null there."""
    names: dict[str, None] = {}
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise SparseftError(f"{what} {i + 1} is a {type(record).__name__}, not a record of fields")
        names.update(dict.fromkeys(record))
    return {name: [r.get(name) for r in records] for name in names}


def _read_json(path: Path) -> dict[str, list[Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text, parse_int=str, parse_float=str)
        except json.JSONDecodeError:
            data = None  # JSON lines under a .json name
        if isinstance(data, list):
            return _columns(data, "record")
        if isinstance(data, dict):
            lengths = {len(v) if isinstance(v, list) else -1 for v in data.values()}
            if len(lengths) != 1 or -1 in lengths:
                raise SparseftError(
                    "a .json file holds a list of records or a mapping of equal-length columns"
                )
            return data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line, parse_int=str, parse_float=str))
            except json.JSONDecodeError as e:
                raise SparseftError(f"line {number}: {e}") from None
    if not records:
        raise SparseftError("the file holds no records")
    return _columns(records, "line")


def _read_csv(path: Path) -> dict[str, list[Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise SparseftError("the file has no header row naming its columns")
        columns: dict[str, list[Any]] = {name: [] for name in header}
        for row in reader:
            if len(row) > len(header):
                raise SparseftError(f"line {reader.line_num} has {len(row)} fields, the header {len(header)}")
            for name, value in zip(header, row + [""] * (len(header) - len(row)), strict=True):
                columns[name].append(value if value != "" else None)  # an empty cell is a missing value
    return columns


def load_texts(source: TextSource) -> list[str]:
    records = load_records(source.dataset, source.config, source.split)
    if source.text_field not in records.column_names:
        raise SparseftError(
            f"dataset {source.dataset} has no field {source.text_field!r}; its fields are "
            f"{', '.join(records.column_names)} (choose one with --text-field)"
        )
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
    return random_windows(token_stream(tokenizer, load_texts(source)), num_samples, seqlen, seed)
