"""Atomic writes: build output in a temporary sibling, then rename, so a crash never leaves half a result."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparseft.errors import SparseftError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_modes(root: Path) -> None:
    """Give `root` and what it holds the modes a plain mkdir/open would have: temporary files and directories are
    created private (0600/0700), which would keep other users (a server, a container) from reading the result."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it is flushed to disk and replaces `target`, on
    error it is removed."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SparseftError(f"output path {target} exists and is not a directory; choose another --output")
    if target.exists() and not overwrite:
        raise SparseftError(f"output directory {target} already exists; remove it or choose another --output")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SparseftError(f"cannot create the parent of output directory {target}: {e.strerror}") from e
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _usual_modes(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # a fresh name (an empty directory the rename replaces), so no leftover of another run is in the way
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # the previous result back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_json_target(path: str | os.PathLike[str]) -> None:
    """Refuse a JSON output path that can never be written, before a long run rather than after it."""
    if Path(path).is_dir():
        raise SparseftError(f"{path} is a directory; give a file name for the JSON output")


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename), creating missing parents."""
    check_json_target(path)
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write text atomically (temporary file in the same directory, then rename), creating missing parents."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise SparseftError(f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """Flush every file under `root` to disk, then the directories holding them. A rename is only as durable as
    what it publishes: without this, a power loss can leave the renamed directory holding empty files."""
    paths = [p for p in Path(root).rglob("*") if not p.is_symlink()]
    for path in paths:
        if path.is_file():
            try:
                _fsync(path)
            except OSError as e:
                if e.errno not in _NO_FSYNC:
                    raise
                return  # a filesystem that cannot flush (some FUSE and network mounts): nothing more to do
    for path in [p for p in paths if p.is_dir()] + [Path(root)]:
        fsync_dir(path)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk."""
    # some filesystems cannot fsync a directory; the files in it are flushed anyway
    with contextlib.suppress(OSError):
        _fsync(path)


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
