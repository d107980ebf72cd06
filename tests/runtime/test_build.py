"""A failed or interrupted kernel build leaves nothing half-written and the package still works (portable path)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension

from sparseft.runtime import SparseLinear, build, dispatch


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """An empty kernel cache and no kernels loaded yet in this process (as far as sparseft knows)."""
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "_state", {})
    dispatch.forget_kernels()
    yield tmp_path
    dispatch.forget_kernels()


def test_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPARSEFT_CACHE", str(tmp_path / "c"))
    assert build.cache_root() == tmp_path / "c"
    monkeypatch.delenv("SPARSEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert build.cache_root() == tmp_path / "x" / "sparseft"


@pytest.mark.parametrize("failure", [RuntimeError("Error building extension"), OSError("no compiler")])
def test_failed_build_falls_back_to_torch(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    def broken_build(**kwargs: object) -> None:
        Path(str(kwargs["build_directory"]), build.LIBRARY).write_bytes(b"half a library")
        raise failure

    monkeypatch.setattr(cpp_extension, "load", broken_build)
    with pytest.warns(RuntimeWarning, match="portable torch path"):
        assert build.load_extension() is False
    assert build.load_extension() is False  # decided once, warned once
    assert list(fresh_build.rglob(build.LIBRARY)) == []  # nothing half-written stays in the cache
    assert dispatch.best_isa() == "torch"

    torch.manual_seed(0)
    linear = nn.Linear(40, 9)
    with torch.no_grad():
        linear.weight[:, ::2] = 0
    x = torch.randn(3, 40)
    expected = nn.functional.linear(x.bfloat16().float(), linear.weight.bfloat16().float(), linear.bias)
    torch.testing.assert_close(SparseLinear.from_linear(linear)(x), expected, rtol=1e-4, atol=1e-4)


def test_a_cache_that_cannot_be_written_falls_back_naming_the_setting(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fresh_build / "file").write_text("")
    monkeypatch.setenv("SPARSEFT_CACHE", str(fresh_build / "file" / "cache"))  # a path under a file
    with pytest.warns(RuntimeWarning, match="Point SPARSEFT_CACHE to a directory you can write"):
        assert build.load_extension() is False
    assert dispatch.best_isa() == "torch"


def test_no_home_directory_falls_back_naming_the_setting(
    fresh_build: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    for name in ("SPARSEFT_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", no_home)
    with pytest.warns(RuntimeWarning, match="home directory.*Point SPARSEFT_CACHE"):
        assert build.load_extension() is False


def test_interrupted_build_leaves_no_library(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(**kwargs: object) -> None:
        Path(str(kwargs["build_directory"]), build.LIBRARY).write_bytes(b"half a library")
        raise KeyboardInterrupt

    monkeypatch.setattr(cpp_extension, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.load_extension()
    assert [p for p in fresh_build.rglob("*") if p.is_file()] == []


def test_a_corrupted_cached_library_is_named_with_the_fix(fresh_build: Path) -> None:
    target = fresh_build / "kernels" / build._key() / build.LIBRARY
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a library")
    expected = f"cached library does not load; delete {re.escape(str(target.parent))} to build it again"
    with pytest.warns(RuntimeWarning, match=expected):
        assert build.load_extension() is False
    assert dispatch.best_isa() == "torch"


def test_kernels_run_on_torchs_threads_with_one_openmp_runtime() -> None:
    if not build.load_extension():
        pytest.skip("no C++ kernels on this machine")
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert build.extension().parallel_threads() == 2  # parallel_for really splits the rows
        torch.set_num_threads(1)
        assert build.extension().parallel_threads() == 1  # and follows torch's setting
    finally:
        torch.set_num_threads(previous)
    if not Path("/proc/self/maps").exists():
        return
    # in a fresh process: other tests load libraries with OpenMP runtimes of their own (sentencepiece's wheel)
    script = (
        "from pathlib import Path; from sparseft.runtime import build; build.load_extension(); "
        "print(len({l.split()[-1] for l in Path('/proc/self/maps').read_text().splitlines() if 'libgomp' in l}))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) <= 1, "the kernels loaded a second OpenMP runtime beside torch's"
