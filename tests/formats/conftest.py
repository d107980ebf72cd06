from collections.abc import Callable
from pathlib import Path

import pytest

import sparseft
from tests.helpers import pruned_dir


@pytest.fixture
def archive(make_model_dir: Callable[..., Path], tmp_path: Path) -> Path:
    source = pruned_dir(make_model_dir, tmp_path, "float32")
    sparseft.export(str(source), tmp_path / "archive", "bitmask", progress=False)
    return tmp_path / "archive"
