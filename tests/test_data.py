import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft.data import TextSource, calibration_samples, load_texts, random_windows, token_stream
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


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SparseftError, match="does not exist"):
        load_texts(TextSource(str(tmp_path / "missing.jsonl")))
    with pytest.raises(SparseftError, match="is a directory; pass one data file"):
        load_texts(TextSource(str(tmp_path)))


def test_a_hub_dataset_that_cannot_be_reached_names_the_local_way(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (OfflineModeIsEnabled)\nmore detail")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SparseftError, match="without network access, pass a local") as info:
        load_texts(TextSource("wikitext", "wikitext-2-raw-v1", "test"))
    assert "\n" not in str(info.value)


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


def test_local_values_are_read_as_written(tmp_path: Path) -> None:
    from sparseft.data import load_records

    (tmp_path / "a.csv").write_text("q,answer\nx,2.50\nNA,007\nnull,\n")
    csv = load_records(str(tmp_path / "a.csv"))
    assert csv["q"] == ["x", "NA", "null"] and csv["answer"] == [
        "2.50",
        "007",
        None,
    ]  # an empty cell is missing
    (tmp_path / "b.jsonl").write_text(
        '{"answer": 12}\n\n{"answer": 3.50, "extra": {"k": [1]}}\n{"answer": "1"}\n'
    )
    jsonl = load_records(str(tmp_path / "b.jsonl"))
    assert jsonl["answer"] == ["12", "3.50", "1"] and jsonl["extra"][0] is None
    columns = {"question": ["a", "b"], "answer": [1, 2]}
    (tmp_path / "c.json").write_text(json.dumps(columns))
    (tmp_path / "d.json").write_text(
        json.dumps([{"question": "a", "answer": 1}, {"question": "b", "answer": 2}])
    )
    for name in ("c.json", "d.json"):
        assert load_records(str(tmp_path / name))[:] == {"question": ["a", "b"], "answer": ["1", "2"]}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.jsonl", "", "holds no records"),
        ("f.jsonl", '{"a": 1}\n{"a": \n', "line 2: Expecting value"),
        ("g.json", '{"a": [1, 2], "b": [1]}', "columns .* are of different lengths"),
        ("h.jsonl", '{"a": 1}\n[1, 2]\n', "line 2 is a list, not a record"),
        ("i.csv", "", "no header row"),
        ("j.csv", "a,b\n1,2,3\n", "line 2 has 3 fields, the header 2"),
    ],
)
def test_a_malformed_local_file_is_one_line_naming_it(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    from sparseft.data import load_records

    (tmp_path / name).write_text(content)
    with pytest.raises(SparseftError, match=f"cannot parse .*{name} as .*{message}") as info:
        load_records(str(tmp_path / name))
    assert "\n" not in str(info.value)


def test_local_files_as_other_tools_write_them(tmp_path: Path) -> None:
    from sparseft.data import load_records

    (tmp_path / "bom.csv").write_bytes(
        "\ufeffquestion,answer\nq1,1\n\nq2,2\n".encode()
    )  # Excel: BOM, blank line
    assert load_records(str(tmp_path / "bom.csv"))[:] == {"question": ["q1", "q2"], "answer": ["1", "2"]}
    (tmp_path / "long.csv").write_text("text\n" + "x" * 200_000 + "\n")  # past csv's default field limit
    assert len(load_records(str(tmp_path / "long.csv"))["text"][0]) == 200_000
    line = json.dumps(
        {"text": "a\u2028b", "audio": {"array": [0.5, 1], "sampling_rate": 16000}}, ensure_ascii=False
    )
    (tmp_path / "bom.jsonl").write_bytes(("\ufeff" + line + "\n").encode())
    record = load_records(str(tmp_path / "bom.jsonl"))[0]
    assert record["text"] == "a\u2028b"  # a line separator inside a string does not end the line
    assert record["audio"] == {"array": [0.5, 1.0], "sampling_rate": 16000}  # numbers inside stay numbers
    (tmp_path / "one.json").write_text(json.dumps({"question": "q", "answer": 4}))
    assert load_records(str(tmp_path / "one.json"))[:] == {"question": ["q"], "answer": ["4"]}


def test_malformed_local_files_name_what_is_wrong(tmp_path: Path) -> None:
    from sparseft.data import load_records

    (tmp_path / "twice.csv").write_text("a,a,b\n1,2,3\n")
    with pytest.raises(SparseftError, match="names a more than once"):
        load_records(str(tmp_path / "twice.csv"))
    (tmp_path / "comma.json").write_text('[\n  {"a": 1},\n  {"a": 2},\n]\n')  # a trailing comma on line 4
    with pytest.raises(SparseftError, match="line 4"):
        load_records(str(tmp_path / "comma.json"))
