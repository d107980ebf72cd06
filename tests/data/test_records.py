import json
from pathlib import Path

import pytest

from sparseft.data.records import load_records
from sparseft.data.text import TextSource, load_texts
from sparseft.errors import SparseftError


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


def test_local_values_are_read_as_written(tmp_path: Path) -> None:

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

    (tmp_path / name).write_text(content)
    with pytest.raises(SparseftError, match=f"cannot parse .*{name} as .*{message}") as info:
        load_records(str(tmp_path / name))
    assert "\n" not in str(info.value)


def test_local_files_as_other_tools_write_them(tmp_path: Path) -> None:

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

    (tmp_path / "twice.csv").write_text("a,a,b\n1,2,3\n")
    with pytest.raises(SparseftError, match="names a more than once"):
        load_records(str(tmp_path / "twice.csv"))
    (tmp_path / "comma.json").write_text('[\n  {"a": 1},\n  {"a": 2},\n]\n')  # a trailing comma on line 4
    with pytest.raises(SparseftError, match="line 4"):
        load_records(str(tmp_path / "comma.json"))
