"""Records from a local file (txt, jsonl, json, csv, parquet) or the `datasets` hub, as one `datasets.Dataset`:
what every kind of data (calibration text, task records, translation pairs, speech) is read through."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sparseft.errors import SparseftError, first_line

LOCAL_FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


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
    # datasets and pyarrow are imported on first use here and below: they are slow to import, and every verb
    # imports this module while only some read records.
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
