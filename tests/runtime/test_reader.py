"""The plain-read safetensors reader returns what safetensors wrote, padded on request, and refuses damage."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sparseft.errors import SparseftError
from sparseft.runtime.reader import TensorReader


def test_reads_every_dtype_with_padding(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 5).bfloat16(),
        "b": torch.randint(-128, 127, (17,), dtype=torch.int8),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
        "e": torch.randn(2),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    reader = TensorReader(tmp_path, dict.fromkeys(tensors, "m.safetensors"))
    for name, expected in tensors.items():
        assert torch.equal(reader.read(name), expected)
    padded = reader.read("b", pad_bytes=64)
    assert torch.equal(padded, tensors["b"])
    tail = torch.empty(0, dtype=torch.int8).set_(padded.untyped_storage(), 0, (17 + 64,), (1,))[17:]
    assert not bool(tail.any())


def test_damaged_files_are_refused(tmp_path: Path) -> None:
    save_file({"a": torch.randn(100)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-40])
    reader = TensorReader(tmp_path, {"a": "m.safetensors", "b": "m.safetensors"})
    with pytest.raises(SparseftError, match="truncated"):
        reader.read("a")
    with pytest.raises(SparseftError, match="tensor b is missing"):
        reader.read("b")
    with pytest.raises(SparseftError, match="lacks tensor c"):
        reader.read("c")
    (tmp_path / "bad.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(SparseftError, match="damaged"):
        TensorReader(tmp_path, {"x": "bad.safetensors"}).read("x")


def _with_header(path: Path, header: object, data: bytes = b"") -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


@pytest.mark.parametrize(
    "header",
    [
        2**64 - 1,  # a header length past the file (and past memory)
        2**40,
        ["not", "a", "dict"],
        {"x": {"dtype": "F32", "data_offsets": [0, 4]}},  # no shape
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
        {"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, -4]}},
        {
            "x": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}
        },  # more than the file holds
    ],
)
def test_damaged_headers_are_refused_before_allocating(tmp_path: Path, header: object) -> None:
    path = tmp_path / "m.safetensors"
    if isinstance(header, int):
        path.write_bytes(struct.pack("<Q", header) + b"{}")
    else:
        _with_header(path, header, b"\0" * 16)
    reader = TensorReader(tmp_path, {"x": "m.safetensors"})
    with pytest.raises(SparseftError, match="damaged|truncated") as caught:
        reader.read("x")
    assert "m.safetensors" in str(caught.value)
    with pytest.raises(SparseftError):
        reader.map("x")


def test_mapped_tensors_match_and_are_private(tmp_path: Path) -> None:
    tensors = {"w": torch.randn(64, 33).bfloat16(), "i": torch.arange(5)}
    save_file(tensors, tmp_path / "m.safetensors")
    reader = TensorReader(tmp_path, dict.fromkeys(tensors, "m.safetensors"))
    assert reader.dtype("w") == torch.bfloat16
    mapped = reader.map("w")
    assert torch.equal(mapped, tensors["w"]) and torch.equal(reader.map("i"), tensors["i"])
    mapped.zero_()  # copy-on-write: the file keeps its values
    assert torch.equal(TensorReader(tmp_path, {"w": "m.safetensors"}).read("w"), tensors["w"])
