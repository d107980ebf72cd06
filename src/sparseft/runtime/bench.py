"""Measuring generation: prefill and decode tokens per second, the bytes a model holds, the memory bandwidth.

Timings on a shared or throttled machine drift, so callers compare models side by side in one process,
alternating them run by run, and report medians with a copy-bandwidth probe beside them.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers), shared storage counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """A STREAM-like copy: GB/s of bytes read plus bytes written, best of `repeats`."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


@torch.inference_mode()
def _generate_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(  # type: ignore[operator]
        input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    return time.perf_counter() - start


def measure_generation(
    models: dict[str, nn.Module], prompt_tokens: int = 128, new_tokens: int = 64, runs: int = 3, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Prefill and decode tokens/s of each model, alternating the models run by run; medians of `runs`.

    Prefill: a prompt of `prompt_tokens` random ids, one new token. Decode: the extra time of `new_tokens`
    new tokens over that, per extra token (greedy, no early stop)."""
    configs: list[Any] = [m.config for m in models.values()]
    vocab = min(int(c.vocab_size) for c in configs)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    for model in models.values():  # warm-up: first calls allocate caches and fill the allocator
        _generate_seconds(model, ids[:, :8], 2)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    bandwidth = []
    for _ in range(runs):
        bandwidth.append(copy_bandwidth(128, 3))
        for name, model in models.items():
            first = _generate_seconds(model, ids, 1)
            full = _generate_seconds(model, ids, new_tokens)
            prefill[name].append(prompt_tokens / first)
            decode[name].append((new_tokens - 1) / max(full - first, 1e-9))
    return {
        name: {
            "prefill_tok_s": round(statistics.median(prefill[name]), 2),
            "decode_tok_s": round(statistics.median(decode[name]), 2),
            "model_bytes": model_bytes(model),
        }
        for name, model in models.items()
    } | {
        "_machine": {"threads": torch.get_num_threads(), "copy_gb_s": round(statistics.median(bandwidth), 1)}
    }
