"""Compile the C++ CPU kernels once into a cache and load them; fall back to plain torch if that fails.

The library, a Python extension module, is built with torch's own extension machinery (ninja + the system C++
compiler) in a temporary directory and then moved into the cache with one rename, so an interrupted or failed
build never leaves a half-written library behind: the next run builds again, and this run uses the portable torch
path. The cache key covers the sources and headers, torch's version and the Python version, so an upgrade
rebuilds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

KERNEL_DIR = Path(__file__).parent / "kernels"
SOURCES = sorted(path.name for path in KERNEL_DIR.glob("*.cpp"))
HEADERS = sorted(path.name for path in KERNEL_DIR.glob("*.h"))
LIBRARY = "sparseft_cpu.so"
# -fopenmp is what makes at::parallel_for split the rows: without it torch's header-only parallel_for compiles
# to a serial loop. The library then needs libgomp.so.1, which the dynamic loader resolves to the copy torch has
# already loaded, so there is one OpenMP runtime and one thread pool in the process.
# -ffp-contract=off: no fused multiply-adds the source did not ask for, so kernels that compute the same
# expression round the same way (an AMX kernel's scale-then-bias had become one FMA, one ulp off the other's).
CFLAGS = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]

_state: dict[str, Any] = {}  # "loaded": whether the kernels are usable; "module": the extension module


def cache_root() -> Path:
    """`$SPARSEFT_CACHE`, else `$XDG_CACHE_HOME/sparseft`, else `~/.cache/sparseft`."""
    if os.environ.get("SPARSEFT_CACHE"):
        return Path(os.environ["SPARSEFT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparseft"


def _key() -> str:
    digest = hashlib.sha256()
    for name in [*SOURCES, *HEADERS]:
        digest.update(name.encode() + (KERNEL_DIR / name).read_bytes())
    # the machine too: a home directory may be shared between x86-64 and other hosts
    digest.update(
        f"{torch.__version__} {sys.version_info[:2]} {CFLAGS} {LDFLAGS} {platform.machine()}".encode()
    )
    return digest.hexdigest()[:16]


def _ninja_dir() -> str:
    try:
        import ninja

        return str(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        return str(Path(sys.executable).parent)


def _compile(target: Path) -> ModuleType:
    from torch.utils import cpp_extension

    print("sparseft: compiling the CPU kernels (once, about a minute)...", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))
    path = os.environ.get("PATH", "")
    try:
        # torch runs `ninja` from PATH; the pip-installed one sits beside this Python, which is not on PATH
        # when the virtual environment is used without being activated.
        os.environ["PATH"] = os.pathsep.join([_ninja_dir(), path])
        module = cpp_extension.load(
            name="sparseft_cpu",
            sources=[str(KERNEL_DIR / name) for name in SOURCES],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            extra_include_paths=[str(KERNEL_DIR)],
            build_directory=str(workdir),
            is_python_module=True,
            verbose=False,
        )
        os.replace(workdir / LIBRARY, target)  # one rename: the cache holds a whole library or none
        return module
    finally:
        os.environ["PATH"] = path
        shutil.rmtree(workdir, ignore_errors=True)


def _import(target: Path) -> ModuleType:
    try:
        spec = importlib.util.spec_from_file_location("sparseft_cpu", target)
        if spec is None or spec.loader is None:
            raise ImportError("not a Python extension module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as e:
        raise ImportError(
            f"the cached library does not load; delete {target.parent} to build it again ({e})"
        ) from None
    return module


def extension() -> ModuleType:
    """The kernels' module (after `load_extension()` returned True)."""
    module: ModuleType = _state["module"]
    return module


def load_extension() -> bool:
    """Load the kernels (compiling them the first time); False, with one warning, if that is impossible."""
    if "loaded" in _state:
        return _state["loaded"]
    try:
        target = cache_root() / "kernels" / _key() / LIBRARY
        target.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as e:  # no home directory, a cache directory we cannot write
        return _unavailable(e, "Point SPARSEFT_CACHE to a directory you can write to fix this.")
    try:
        _state["module"] = _import(target) if target.exists() else _compile(target)
        _state["loaded"] = True
    except Exception as e:  # a missing compiler, a failed build, a library that does not load
        return _unavailable(e, "" if target.exists() else "Install a C++ compiler and ninja to fix this.")
    return _state["loaded"]


def _unavailable(error: Exception, fix: str) -> bool:
    reason = str(error).splitlines()[0][:300] if str(error) else ""
    warnings.warn(
        f"sparseft: the C++ CPU kernels are unavailable ({type(error).__name__}: {reason}); "
        f"using the portable torch path, which is much slower. {fix}".rstrip(),
        RuntimeWarning,
        stacklevel=3,
    )
    _state["loaded"] = False
    return False
