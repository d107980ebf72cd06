"""Text generation on the runtime's own decoders: prefill the prompt into a static cache, then one token per row
per step (greedy, or sampled with temperature, top-k and top-p) until every row has ended or the budget is
spent."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparseft.errors import SparseftError


def end_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The tokens that end a text: `eos_token_id`, else the model's generation config's, else its config's."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(i) for i in eos_token_id}


def choose(
    logits: torch.Tensor,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The next token of each row from its logits (B, V): the largest, or a sample from the softmax of the logits
    over `temperature`, kept to the `top_k` largest and to the smallest set whose probability reaches `top_p`."""
    if not do_sample:
        # torch's argmax over bf16 is several times slower than the exact conversion to float32 and its argmax
        return logits.float().argmax(-1)
    scores = logits.float() / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the tokens ahead
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, before >= top_p)
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


def _check(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if max_new_tokens < 0:
        raise SparseftError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not temperature > 0:
        raise SparseftError(f"temperature must be above 0, got {temperature}; use do_sample=False for greedy")
    if top_k < 0:
        raise SparseftError(f"top_k must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        raise SparseftError(f"top_p must be in (0, 1], got {top_p}")


def _prefill(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: Any
) -> torch.Tensor:
    """The last logits of each prompt, its keys and values cached. The rows of a batch are prefilled one by one,
    left-padded ones without their padding, so each row's numbers are those it gets alone (a batched prompt
    would take other kernels: the decompress-and-matmul path past a few tokens)."""
    if input_ids.shape[0] == 1 and (attention_mask is None or bool(attention_mask.all())):
        return model(input_ids, cache=cache, last_only=True).logits[:, -1]
    cache.begin(*input_ids.shape, attention_mask)
    rows = []
    for row, start in enumerate(cache.starts):
        rows.append(
            model(input_ids[row : row + 1, start:], cache=cache.row(row), last_only=True).logits[:, -1]
        )
    cache.length = input_ids.shape[1]
    return torch.cat(rows)


@torch.inference_mode()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    callback: Callable[[torch.Tensor], None] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    logits_filter: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The prompts `input_ids` (B, T; left-padded rows marked by `attention_mask`) followed by up to
    `max_new_tokens` new tokens each, as (B, T + new). A row ends at one of the end tokens (`eos_token_id`, else
    the model's) or once its new text holds one of `stop_strings` (decoded with `tokenizer`); an ended row is
    filled with `pad_token_id` (else its end token) while the others go on. `streamer` takes each new token as a
    transformers streamer does (`put`, then `end`); `callback` gets each step's tokens (B,). `logits_filter(step,
    logits)` may change each step's logits before the choice (Whisper's suppressed tokens)."""
    _check(max_new_tokens, temperature, top_k, top_p)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise SparseftError(f"input_ids must be (batch, tokens) with tokens, got {tuple(input_ids.shape)}")
    if stop_strings and tokenizer is None:
        raise SparseftError("stop_strings needs the tokenizer to decode the new text; pass tokenizer=")
    ends = end_ids(model, eos_token_id)
    batch, prompt = input_ids.shape
    if max_new_tokens == 0:
        return input_ids
    cache = model.new_cache(batch, prompt + max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = _prefill(model, input_ids, attention_mask, cache)
    # which rows have ended, kept in Python: a step's bookkeeping is then one read of its tokens, not four torch ops
    done = [False] * batch
    filler = pad_token_id if pad_token_id is not None else (min(ends) if ends else 0)
    new: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        if logits_filter is not None:
            logits = logits_filter(step, logits)
        token = choose(logits, do_sample, temperature, top_k, top_p, generator)
        if any(done):
            token = torch.where(torch.tensor(done), torch.full_like(token, filler), token)
        new.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if callback is not None:
            callback(token)
        done = [ended or t in ends for ended, t in zip(done, token.tolist(), strict=True)]
        if stop_strings:
            tail = torch.stack(new, 1)
            for row in range(batch):
                if not done[row]:
                    text = tokenizer.decode(tail[row], skip_special_tokens=True)
                    done[row] = any(s in text for s in stop_strings)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(token[:, None], cache=cache, last_only=True).logits[:, -1]
    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new, 1)], 1)
