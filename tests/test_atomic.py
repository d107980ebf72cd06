from pathlib import Path

import pytest

from sparseft.atomic import atomic_dir, write_json
from sparseft.errors import SparseftError


def test_success_renames_into_place(tmp_path: Path) -> None:
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_leaves_nothing_and_keeps_the_old_output(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("keep me")
    with pytest.raises(ValueError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "partial").write_text("half")
        raise ValueError
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old").read_text() == "keep me"


def test_output_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("")
    with pytest.raises(SparseftError, match="not a directory"), atomic_dir(tmp_path / "out"):
        pass


def test_write_json_replaces_atomically(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": 1})
    write_json(tmp_path / "a.json", {"x": 2})
    assert (tmp_path / "a.json").read_text().strip().endswith("}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
