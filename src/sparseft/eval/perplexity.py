"""Perplexity, by the usual protocol: the whole split joined into one token stream, cut
into non-overlapping windows of `seqlen` tokens (the tail that does not fill a window is dropped),
PPL = exp(mean next-token NLL over every predicted token)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft.errors import SparseftError


@torch.no_grad()
def perplexity(
    model: nn.Module, stream: torch.Tensor, seqlen: int, batch_size: int = 1, progress: bool = True
) -> dict[str, Any]:
    windows = stream.numel() // seqlen
    if windows == 0:
        raise SparseftError(
            f"the evaluation text has {stream.numel()} tokens, fewer than one window of seqlen={seqlen}"
        )
    data = stream[: windows * seqlen].view(windows, seqlen)
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    for start in tqdm(range(0, windows, batch_size), desc="perplexity", disable=not progress):
        ids = data[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += ids[:, 1:].numel()
    return {"perplexity": math.exp(total_nll / total_tokens), "windows": windows, "tokens": total_tokens}
