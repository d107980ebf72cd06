import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft.data.text import TextSource, calibration_samples, load_texts, random_windows, token_stream
from sparseft.errors import SparseftError


def test_reads_local_text_jsonl_and_csv(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world\n\nsecond paragraph")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(3)))
    (tmp_path / "c.csv").write_text("body,other\nx,1\ny,2\n")
    assert load_texts(TextSource(str(tmp_path / "a.txt"))) == ["hello world\n\nsecond paragraph"]
    assert load_texts(TextSource(str(tmp_path / "b.jsonl"), text_field="body")) == [
        "line 0",
        "line 1",
        "line 2",
    ]
    assert load_texts(TextSource(str(tmp_path / "c.csv"), text_field="body")) == ["x", "y"]


def test_missing_text_field_names_the_fields(tmp_path: Path) -> None:
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(SparseftError, match="no field 'text'.*body"):
        load_texts(TextSource(str(tmp_path / "b.jsonl")))


def test_windows_are_seeded_and_in_range() -> None:
    stream = torch.arange(1000)
    a = random_windows(stream, 8, 50, seed=1)
    assert a.shape == (8, 50)
    assert torch.equal(a, random_windows(stream, 8, 50, seed=1))
    assert not torch.equal(a, random_windows(stream, 8, 50, seed=2))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous windows of the stream


def test_too_little_text_for_one_window() -> None:
    with pytest.raises(SparseftError, match="fewer than one window"):
        random_windows(torch.arange(10), 2, 11, seed=0)


def test_calibration_samples_from_a_file(tokenizer: object, text_file: Path) -> None:
    ids = calibration_samples(tokenizer, TextSource(str(text_file)), 3, 64, seed=0)
    assert ids.shape == (3, 64) and ids.dtype == torch.long


class CountingTokenizer:
    """A tokenizer that counts the characters it was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.chars = 0

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.chars += len(text)
        return self.tokenizer(text, **kwargs)


WORDS = 300_000  # "w000000 w000001 ...": 2.4 MB, each word saying where it stands


@pytest.fixture(scope="module")
def numbered_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("numbered") / "big.txt"
    path.write_text(" ".join(f"w{i:06d}" + ("\n" if i % 16 == 15 else "") for i in range(WORDS)))
    return path


def test_calibration_from_a_large_file_tokenizes_only_its_windows(
    tokenizer: Any, numbered_text: Path
) -> None:
    text = numbered_text.read_text()
    counting = CountingTokenizer(tokenizer)
    windows = calibration_samples(counting, TextSource(str(numbered_text)), 8, 64, seed=0)
    assert windows.shape == (8, 64) and windows.dtype == torch.long
    assert counting.chars < len(text) / 50  # pieces around the windows, not the file
    for window in windows.tolist():  # each window is tokens of the running text
        assert tokenizer.decode(window) in text
    assert torch.equal(windows, calibration_samples(tokenizer, TextSource(str(numbered_text)), 8, 64, seed=0))
    assert not torch.equal(
        windows, calibration_samples(tokenizer, TextSource(str(numbered_text)), 8, 64, seed=1)
    )


def test_calibration_windows_reach_the_whole_file(tokenizer: Any, numbered_text: Path) -> None:
    seen = [
        int(number)
        for seed in range(6)
        for window in calibration_samples(tokenizer, TextSource(str(numbered_text)), 8, 32, seed).tolist()
        for number in re.findall(r"w(\d{6})", tokenizer.decode(window))
    ]
    assert min(seen) < WORDS * 0.1 and max(seen) > WORDS * 0.9
    # 48 windows fall in most tenths of the file
    assert len({n * 10 // WORDS for n in seen}) >= 8


def test_calibration_from_records_tokenizes_only_its_windows(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": " ".join(f"r{r}w{w}" for w in range(200))}) for r in range(500))
    )
    counting = CountingTokenizer(tokenizer)
    windows = calibration_samples(counting, TextSource(str(path)), 4, 64, seed=0)
    assert windows.shape == (4, 64) and counting.chars < path.stat().st_size / 20


def test_calibration_from_a_small_file_tokenizes_it_whole(
    tokenizer: Any, text_file: Path, tmp_path: Path
) -> None:
    """A text no longer than the windows' pieces: its windows are cut from the whole token stream."""
    small = tmp_path / "small.txt"
    small.write_text(text_file.read_text()[:1500])
    assert torch.equal(
        calibration_samples(tokenizer, TextSource(str(small)), 4, 64, seed=2),
        random_windows(token_stream(tokenizer, [small.read_text()]), 4, 64, seed=2),
    )


def test_a_text_file_has_only_the_text_field(tokenizer: Any, numbered_text: Path) -> None:
    with pytest.raises(SparseftError, match="no field 'body'; its fields are text"):
        calibration_samples(tokenizer, TextSource(str(numbered_text), text_field="body"), 2, 16)
