"""Distillation losses: task cross-entropy, logit KD and SquareHead, as plain functions over tensors.

The formulas are those of Kurtic et al. (2023) and the paper's code:

    CE          mean over label tokens of -log p_s(label)
    KD          T^2 * sum_tokens KL(softmax(z_t / T) || softmax(z_s / T)) / N_label_tokens   (teacher first)
    SquareHead  sum over blocks l of  mean[(f_s^l - f_t^l)^2] / (mean[(f_t^l)^2] + eps)

SquareHead's means run over the non-padding tokens x hidden dims of one block output; the layer terms are summed,
not averaged. Every function takes the tensors already aligned (token t of the student with token t of the teacher
and of the mask), so the model-specific part, which hidden states to compare and under which mask, lives in
`block_outputs` and `aligned_predictions` alone. An encoder-decoder model adds its branch there (encoder block
outputs under the encoder attention mask, decoder block outputs under the label mask) and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sparseft.data import IGNORE_INDEX

LOSS_PRESETS: dict[str, dict[str, float]] = {
    # The paper's weights: 1 CE + 1 SquareHead for MPT and T5; KD baselines 1 CE + 1 KD; CE alone without a teacher.
    "ce": {"ce": 1.0, "kd": 0.0, "squarehead": 0.0},
    "kd": {"ce": 1.0, "kd": 1.0, "squarehead": 0.0},
    "squarehead": {"ce": 1.0, "kd": 0.0, "squarehead": 1.0},
}


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three terms (0 switches a term off) and the constants inside them."""

    ce: float = 1.0
    kd: float = 0.0
    squarehead: float = 0.0
    temperature: float = 1.0
    eps: float = 1e-8  # the paper used bf16's eps, 0.0078125, for MPT trained in bf16

    @property
    def needs_teacher(self) -> bool:
        return self.kd > 0 or self.squarehead > 0


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE over tokens whose target is not IGNORE_INDEX. `logits` (..., V) and `targets` (...) are aligned."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * sum over masked tokens of KL(teacher || student) at temperature T, divided by the number of them."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL per token, teacher first (forward KL)
    mask = mask.to(kl.dtype)
    return t * t * (kl * mask).sum() / mask.sum().clamp_min(1.0)


def squarehead_layer(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """One block's term: mean[(f_s - f_t)^2] / (mean[f_t^2] + eps), both means over masked tokens x hidden."""
    weight = mask.to(torch.float32).unsqueeze(-1)  # (batch, tokens, 1): broadcast over the hidden dims
    count = weight.sum().clamp_min(1.0) * student.shape[-1]
    s, t = student.float(), teacher.float()
    mse = ((s - t).square() * weight).sum() / count
    scale = (t.square() * weight).sum() / count
    return mse / (scale + eps)


def squarehead_loss(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """The sum (not the mean) of `squarehead_layer` over paired block outputs that share one token mask."""
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} block outputs but the teacher has {len(teacher)}")
    terms = [squarehead_layer(s, t, mask, eps) for s, t in zip(student, teacher, strict=True)]
    return torch.stack(terms).sum()


def aligned_predictions(outputs: Any, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) with position t of the logits predicting targets[t].

    A causal LM predicts token t+1 at position t, so labels shift left by one; an encoder-decoder model's decoder
    already reads the right-shifted labels, so there its logits and labels line up as they are.
    """
    labels = batch["labels"]
    if _is_encoder_decoder(outputs):
        return outputs.logits, labels
    return outputs.logits[:, :-1], labels[:, 1:]


def block_outputs(
    outputs: Any, batch: Mapping[str, torch.Tensor]
) -> list[tuple[Sequence[torch.Tensor], torch.Tensor]]:
    """Groups of (block outputs, token mask) that SquareHead compares.

    Hugging Face's `hidden_states` hold the embedding output first and then every block's output, the last one
    after the final norm; SquareHead uses the block outputs only.
    """
    if _is_encoder_decoder(outputs):
        encoder_mask = batch.get("attention_mask")
        if encoder_mask is None:  # Whisper: no encoder mask, every position of its fixed audio window counts
            encoder_mask = torch.ones(outputs.encoder_hidden_states[-1].shape[:2], dtype=torch.bool)
        return [
            (outputs.encoder_hidden_states[1:], encoder_mask.to(outputs.encoder_hidden_states[-1].device)),
            (outputs.decoder_hidden_states[1:], batch["labels"] != IGNORE_INDEX),
        ]
    return [(outputs.hidden_states[1:], batch["attention_mask"])]


def _is_encoder_decoder(outputs: Any) -> bool:
    # The encoder's last hidden state is in every encoder-decoder output; `encoder_hidden_states` is not: Hugging
    # Face fills it only under output_hidden_states=True, which runs without SquareHead do not ask for.
    return getattr(outputs, "encoder_last_hidden_state", None) is not None


def distill_terms(
    student_out: Any, teacher_out: Any | None, batch: Mapping[str, torch.Tensor], weights: LossWeights
) -> dict[str, torch.Tensor]:
    """Every term with a positive weight, and their weighted sum under "loss".

    `student_out`/`teacher_out` are model outputs run with `output_hidden_states=True` when SquareHead is on.
    """
    terms: dict[str, torch.Tensor] = {}
    logits, targets = aligned_predictions(student_out, batch)
    if weights.ce > 0:
        terms["ce"] = cross_entropy(logits, targets)
    if weights.needs_teacher and teacher_out is None:
        raise ValueError("KD and SquareHead need the teacher's outputs")
    if weights.kd > 0:
        teacher_logits, _ = aligned_predictions(teacher_out, batch)
        terms["kd"] = kd_loss(logits, teacher_logits, targets != IGNORE_INDEX, weights.temperature)
    if weights.squarehead > 0:
        pairs = zip(block_outputs(student_out, batch), block_outputs(teacher_out, batch), strict=True)
        terms["squarehead"] = torch.stack(
            [squarehead_loss(s, t, mask, weights.eps) for (s, mask), (t, _) in pairs]
        ).sum()
    terms["loss"] = sum(getattr(weights, name) * value for name, value in terms.items())
    return terms
