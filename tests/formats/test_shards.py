import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import sparseft
from sparseft.errors import SparseftError


def test_truncated_safetensors_is_a_clear_error(archive: Path) -> None:
    file = archive / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(SparseftError, match="damaged"):
        sparseft.load(archive)


def test_corrupted_safetensors_header_is_a_clear_error(archive: Path) -> None:
    file = archive / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\xff" * 32
    file.write_bytes(bytes(data))
    with pytest.raises(SparseftError, match="damaged"):
        sparseft.api.info(archive)


def test_index_naming_a_missing_file_is_a_clear_error(archive: Path) -> None:
    tensors = load_file(str(archive / "model.safetensors"))
    (archive / "model.safetensors").unlink()
    save_file(tensors, str(archive / "model-00001-of-00002.safetensors"))
    weight_map = dict.fromkeys(tensors, "model-00001-of-00002.safetensors")
    weight_map["model.norm.weight"] = "model-00002-of-00002.safetensors"
    (archive / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    with pytest.raises(SparseftError, match="model-00002-of-00002.safetensors, which is missing"):
        sparseft.load(archive)
