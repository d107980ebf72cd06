"""Collectives over the processes of an accelerate run (DDP or FSDP); in a single process they return their input."""

from __future__ import annotations

from typing import Any

import torch


def reduce_mean(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=accelerator.device)
    tensor = accelerator.reduce(tensor, reduction="mean")
    return dict(zip(keys, tensor.tolist(), strict=True))


def reduce_sum(accelerator: Any, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="sum").item())


def is_sharded(accelerator: Any) -> bool:
    return "FSDP" in str(accelerator.distributed_type)
