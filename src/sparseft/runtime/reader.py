"""Read tensors from safetensors files with plain reads into buffers we own, never through a memory map.

Reading through a map leaves every page touched resident in the process until the file is closed, so loading an
archive that way peaks at the archive's size plus the packed copies. Reading straight into the runtime's own
buffers (with the padding the kernels need already in place) keeps the peak at the compressed size itself.
The safetensors layout: an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}} (offsets relative to the end of the header), then the data.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

import torch

from sparseft.errors import SparseftError

DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorReader:
    """Tensors by name from the safetensors files of a directory, given the name -> file map."""

    def __init__(self, directory: Path, weight_map: dict[str, str]) -> None:
        self.directory = directory
        self.weight_map = weight_map
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            path = self.directory / file
            try:
                with open(path, "rb") as f:
                    (length,) = struct.unpack("<Q", f.read(8))
                    header = json.loads(f.read(length))
            except (OSError, ValueError, struct.error) as e:
                raise SparseftError(f"cannot read {path}: {e} (the file is damaged; copy it again)") from e
            self._headers[file] = (8 + length, header)
        return self._headers[file]

    def _locate(self, name: str) -> tuple[Path, torch.dtype, list[int], int, int]:
        """File, dtype, shape, element count and byte offset of tensor `name`, checked against each other."""
        file = self.weight_map.get(name)
        if file is None:
            raise SparseftError(f"{self.directory} lacks tensor {name}")
        start, header = self._header(file)
        entry = header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise SparseftError(f"{self.directory / file}: tensor {name} is missing or of an unknown dtype")
        dtype = DTYPES[entry["dtype"]]
        shape = [int(s) for s in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * torch.tensor([], dtype=dtype).element_size():
            raise SparseftError(
                f"{self.directory / file}: tensor {name} has {end - begin} bytes for shape {shape}"
            )
        return self.directory / file, dtype, shape, count, start + begin

    def dtype(self, name: str) -> torch.dtype:
        return self._locate(name)[1]

    def read(self, name: str, pad_bytes: int = 0) -> torch.Tensor:
        """Tensor `name`; with `pad_bytes`, its 1-D buffer is followed by that many zero bytes (not in the result's
        shape, but in its storage, where the kernels' full-vector loads may reach)."""
        path, dtype, shape, count, offset = self._locate(name)
        size = torch.tensor([], dtype=dtype).element_size()
        buffer = torch.empty(count + -(-pad_bytes // size), dtype=dtype)
        buffer[count:] = 0
        with open(path, "rb") as f:
            f.seek(offset)
            view = buffer.view(torch.uint8).numpy().data[: count * size]
            if f.readinto(view) != count * size:
                raise SparseftError(f"{path} is truncated (tensor {name}); copy it again")
        return buffer[:count].view(shape)

    def map(self, name: str) -> torch.Tensor:
        """Tensor `name` mapped from its file (private, copy-on-write): pages enter memory only when read, so
        the rows of an embedding table that no token looks up never do (transformers maps its weights too)."""
        path, dtype, shape, count, offset = self._locate(name)
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if offset + count * torch.tensor([], dtype=dtype).element_size() > len(self._maps[path]):
            raise SparseftError(f"{path} is truncated (tensor {name}); copy it again")
        return torch.frombuffer(self._maps[path], dtype=dtype, count=count, offset=offset).view(shape)
