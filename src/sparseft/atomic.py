"""Atomic writes: build output in a temporary sibling, then rename, so a crash never leaves half a result."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparseft.errors import SparseftError


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target`, on error it is removed."""
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write JSON atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
