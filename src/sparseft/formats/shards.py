"""The safetensors files of a checkpoint directory, named and indexed as transformers names them: written in
shards of bounded size, read back lazily and checked (a missing or damaged file is one clear error)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparseft.errors import SparseftError
from sparseft.io import write_json

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3


class ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes`, named and indexed like transformers shards.

    Tensors are added in groups that always land in the same file; only the current shard is held in memory.
    """

    def __init__(self, directory: Path, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending.update({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
        self._pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        name = f"shard-{len(self.files):05d}.tmp"
        save_file(self._pending, str(self.directory / name), metadata={"format": "pt"})
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self._pending, name))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.directory / self.files[0], self.directory / SINGLE)
            return
        final = {
            tmp: f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors" for i, tmp in enumerate(self.files)
        }
        for tmp, name in final.items():
            os.replace(self.directory / tmp, self.directory / name)
        weight_map = {key: final[tmp] for key, tmp in sorted(self.weight_map.items())}
        write_json(self.directory / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})


class Shards:
    """Lazy, validated access to the tensors of a directory of safetensors files (single file or indexed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._handles: dict[str, Any] = {}
        index = directory / INDEX
        if index.exists():
            data = read_json(index)
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            if not isinstance(weight_map, dict):
                raise SparseftError(f"{index} has no weight_map; the checkpoint is damaged, export it again")
            self.weight_map: dict[str, str] = dict(weight_map)
            for file in sorted(set(self.weight_map.values())):
                if not (directory / file).is_file():
                    raise SparseftError(
                        f"{index} names {file}, which is missing from {directory}; copy it back"
                    )
        elif (directory / SINGLE).is_file():
            self.weight_map = dict.fromkeys(self._open(SINGLE).keys(), SINGLE)
        else:
            raise SparseftError(
                f"{directory} has neither {SINGLE} nor {INDEX}; it is not a safetensors checkpoint"
            )

    def _open(self, file: str) -> Any:
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.directory / file), framework="pt")
            except Exception as e:  # SafetensorError, OSError: a truncated or corrupted file
                raise SparseftError(
                    f"cannot read {self.directory / file}: {e} (the file is damaged; copy it again)"
                ) from e
        return self._handles[file]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __iter__(self) -> Iterator[str]:
        return iter(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise SparseftError(
                f"tensor {name} is missing from {self.directory}; the checkpoint is incomplete"
            )
        handle = self._open(self.weight_map[name])
        try:
            return handle.get_tensor(name)
        except Exception as e:  # a name in the index but not in the file, or unreadable data
            raise SparseftError(f"cannot read tensor {name} from {self.weight_map[name]}: {e}") from e

    def check_headers(self) -> None:
        """Open every file once, so a truncated or corrupted one is reported before any work starts."""
        for file in sorted(set(self.weight_map.values())):
            self._open(file)

    def file_bytes(self) -> int:
        files = set(self.weight_map.values())
        return sum((self.directory / f).stat().st_size for f in files)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SparseftError(f"{path} is missing; pass a directory written by `sparseft export`") from e
    except (OSError, ValueError) as e:
        raise SparseftError(f"cannot parse {path}: {e}") from e


def model_config_dict(model: nn.Module) -> dict[str, Any]:
    config: dict[str, Any] = model.config.to_dict()  # type: ignore[union-attr,operator]
    config["architectures"] = [type(model).__name__]
    config.pop("quantization_config", None)
    return config


def unique_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The state dict without the second copy of tied tensors (lm_head tied to the embeddings)."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        yield name, tensor
