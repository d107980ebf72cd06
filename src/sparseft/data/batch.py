"""Batches of task rows (`sparseft.data.tasks.Row`) and encoder-decoder examples (`sparseft.data.seq2seq.Example`):
for training (`collate`, `model_inputs`), for generation (`encoder_batches`), and as the calibration samples of a
fine-tuning recipe's prune stages (`task_calibration`).

Batches are right-padded to their longest row; padding carries the label IGNORE_INDEX and attention_mask 0.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import cast

import torch

from sparseft.data import IGNORE_INDEX
from sparseft.data.seq2seq import Example
from sparseft.data.tasks import Row
from sparseft.data.text import random_windows
from sparseft.errors import SparseftError


def _pad(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def collate(rows: Sequence[Row] | Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch. Task rows give input_ids, labels, attention_mask (1 on real tokens), and position_ids
    when they are packed; encoder-decoder examples give the encoder input (input_ids + attention_mask, or
    input_features), the decoder_input_ids (padded with `pad_id`) and the labels."""
    if isinstance(rows[0], Example):
        examples = cast(Sequence[Example], rows)
        batch = {
            "decoder_input_ids": _pad([e.decoder_input_ids for e in examples], pad_id),
            "labels": _pad([e.labels for e in examples], IGNORE_INDEX),
        }
        if examples[0].input_features is not None:
            batch["input_features"] = torch.stack([e.input_features for e in examples])  # type: ignore[misc]
        else:
            ids = [e.input_ids or [] for e in examples]
            batch["input_ids"] = _pad(ids, pad_id)
            batch["attention_mask"] = _pad([[1] * len(r) for r in ids], 0)
        return batch
    task_rows = cast(Sequence[Row], rows)
    batch = {
        "input_ids": _pad([r.input_ids for r in task_rows], pad_id),
        "labels": _pad([r.labels for r in task_rows], IGNORE_INDEX),
        "attention_mask": _pad([[1] * len(r.input_ids) for r in task_rows], 0),
    }
    if task_rows[0].position_ids is not None:
        width = batch["input_ids"].shape[1]
        # Pads continue counting from 0 as one more "example", so they never join a real example's mask.
        batch["position_ids"] = torch.tensor(
            [r.position_ids + list(range(width - len(r.input_ids))) for r in task_rows]  # type: ignore[operator]
        )
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward gets: packed batches pass positions and no attention_mask (see
    `sparseft.data.tasks`); encoder-decoder batches pass everything but the labels (the decoder reads
    decoder_input_ids)."""
    if "decoder_input_ids" in batch:
        return {k: v for k, v in batch.items() if k != "labels"}
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def encoder_batches(examples: list[Example], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The encoder inputs of `examples` in batches of `batch_size`, for generation."""
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        batches.append({k: v for k, v in batch.items() if k not in ("labels", "decoder_input_ids")})
    return batches


def task_calibration(
    rows: Sequence[Row] | Sequence[Example],
    num_samples: int,
    seqlen: int,
    seed: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor | list[dict[str, torch.Tensor]]:
    """Calibration samples for `sparseft.pruning.sequential.prune_model` from task data, drawn with `seed`.

    Task rows: `num_samples` random windows of `seqlen` tokens of the task's token stream (all rows joined).
    Encoder-decoder examples: `num_samples` of them, each one batch-1 model-input dict (encoder input +
    decoder_input_ids), audio features in `dtype` (the model's: a bf16 Whisper's convolution stem refuses float32
    input); `seqlen` does not apply, as the examples were cut to their length limits when they were made."""
    if num_samples < 1:
        raise SparseftError(f"num_samples must be at least 1, got {num_samples}")
    if not isinstance(rows[0], Example):
        stream = torch.tensor([i for r in cast(Sequence[Row], rows) for i in r.input_ids], dtype=torch.long)
        return random_windows(stream, num_samples, min(seqlen, stream.numel()), seed)
    examples = cast(Sequence[Example], rows)
    chosen = random.Random(seed).sample(list(examples), min(num_samples, len(examples)))
    samples = []
    for example in chosen:
        batch = collate([example], pad_id=0)  # batch of one: nothing is padded
        batch.pop("labels")
        batch.pop("attention_mask", None)
        if dtype is not None and "input_features" in batch:
            batch["input_features"] = batch["input_features"].to(dtype)
        samples.append(batch)
    return samples
