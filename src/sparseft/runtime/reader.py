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
import os
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
        self._headers: dict[str, tuple[int, int, dict[str, Any]]] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def _header(self, file: str) -> tuple[int, int, dict[str, Any]]:
        """Where the data of `file` starts, the file's size, and its header."""
        if file not in self._headers:
            path = self.directory / file
            damaged = f"{path} is damaged (its safetensors header is unreadable); copy it again"
            try:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    (length,) = struct.unpack("<Q", f.read(8))
                    if length > size - 8:  # checked before reading, so a damaged length allocates nothing
                        raise SparseftError(damaged)
                    header = json.loads(f.read(length))
            except (ValueError, struct.error):
                raise SparseftError(damaged) from None
            except OSError as e:
                raise SparseftError(f"cannot read {path}: {e}") from e
            if not isinstance(header, dict):
                raise SparseftError(damaged)
            self._headers[file] = (8 + length, size, header)
        return self._headers[file]

    def _locate(self, name: str) -> tuple[Path, torch.dtype, list[int], int, int]:
        """File, dtype, shape, element count and byte offset of tensor `name`, checked against each other and
        against the file's size before anything is allocated for it."""
        file = self.weight_map.get(name)
        if file is None:
            raise SparseftError(f"{self.directory} lacks tensor {name}")
        start, size, header = self._header(file)
        path = self.directory / file
        entry = header.get(name)
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPES:
            raise SparseftError(f"{path}: tensor {name} is missing or of an unknown dtype")
        dtype = DTYPES[entry["dtype"]]
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (
            isinstance(shape, list)
            and all(isinstance(s, int) and s >= 0 for s in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
        ):
            raise SparseftError(f"{path}: the header entry of tensor {name} is damaged; copy the file again")
        begin, end = offsets
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * torch.tensor([], dtype=dtype).element_size():
            raise SparseftError(f"{path}: tensor {name} has {end - begin} bytes for shape {shape}")
        if begin < 0 or start + end > size:
            raise SparseftError(f"{path} is truncated (tensor {name}); copy it again")
        return path, dtype, shape, count, start + begin

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
