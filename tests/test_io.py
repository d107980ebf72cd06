import os
import stat
from pathlib import Path
from typing import Any

import pytest

from sparseft.errors import SparseftError
from sparseft.io import atomic_dir, fsync_tree, write_json


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


def test_results_get_the_modes_of_a_plain_write(tmp_path: Path) -> None:
    old_mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f").write_text("x")
        write_json(tmp_path / "out" / "r.json", {})
    finally:
        os.umask(old_mask)
    out = tmp_path / "out"
    modes = {
        p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, out / "sub", out / "sub" / "f", out / "r.json"]
    }
    assert modes == {"out": 0o755, "sub": 0o755, "f": 0o644, "r.json": 0o644}  # not private to the owner


def test_overwrite_is_not_blocked_by_a_leftover_of_a_crashed_run(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    leftover = tmp_path / f".out.old-{os.getpid()}"
    leftover.mkdir()
    (leftover / "x").write_text("from a crash")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new"]


def test_a_failed_rename_puts_the_old_output_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("keep me")
    real_replace = os.replace

    def failing(src: Any, dst: Any) -> None:
        if ".tmp-" in str(src):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new").write_text("new")
    assert (tmp_path / "out" / "old").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_write_json_makes_its_parents_and_refuses_a_directory(tmp_path: Path) -> None:
    write_json(tmp_path / "a" / "b" / "r.json", {"x": 1})
    assert (tmp_path / "a" / "b" / "r.json").exists()
    with pytest.raises(SparseftError, match="is a directory"):
        write_json(tmp_path / "a", {})


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names of descriptors from /proc")
def test_fsync_tree_flushes_every_file_and_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a").write_text("a")
    (tmp_path / "out" / "sub" / "b").write_text("b")
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_tree(tmp_path / "out")
    root = os.path.realpath(tmp_path / "out")
    assert sorted(synced) == sorted(f"{root}{p}" for p in ["", "/a", "/sub", "/sub/b"])
    # a file before the directory naming it
    assert synced.index(f"{root}/sub/b") < synced.index(f"{root}/sub")


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads file names of descriptors from /proc")
def test_atomic_dir_publishes_only_what_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"weights")
        written = os.path.realpath(tmp / "model.safetensors")
    monkeypatch.setattr(os, "fsync", real_fsync)
    renamed = events.index(("replace", str(tmp_path / "out")))
    assert ("fsync", written) in events[:renamed]
    assert ("fsync", os.path.realpath(tmp_path)) in events[renamed:]  # the rename itself


def test_a_filesystem_that_cannot_flush_still_gets_its_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def unsupported(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", unsupported)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert (tmp_path / "out" / "a").read_text() == "a"

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)  # a real write error is not hidden
    with pytest.raises(OSError, match="Input/output"), atomic_dir(tmp_path / "other") as tmp:
        (tmp / "a").write_text("a")
    assert not (tmp_path / "other").exists()
