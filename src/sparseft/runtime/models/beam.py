"""Beam search over a decoder whose cache rows hold the beams, scored as transformers' `generate(num_beams=N)`
scores it (transformers 5.x `GenerationMixin._beam_search`), so that the same logits give the same tokens:

- a beam's score is the sum of its tokens' log-probabilities (log-softmax in float32, then the logits filter,
  which sets suppressed tokens to -inf without renormalising);
- each step keeps the best K = max(2, 1 + number of end tokens) x N continuations over all beams of an input;
  of those, the best N that have not just ended run on, and those among the first N that have just ended (an
  end token, or the last allowed token) are finished hypotheses, scored sum / length ** length_penalty, the
  length counting the new tokens, the end token included;
- an input stops when no running beam can beat its worst finished one: with `early_stopping` False,
  judged by the best running score over the current length (transformers' heuristic); "never" with a positive
  length penalty, over the longest length; True stops once N hypotheses have finished;
- the answer is the best finished hypothesis.

The first step expands only beam 0 (the others start at -1e9), so every beam begins as the same prompt. The
-1e9 offsets and their float32 arithmetic are transformers', kept so that ties break the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional

from sparseft.errors import SparseftError

_NEVER = -1.0e9  # transformers' score for "cannot be chosen"


@dataclass(frozen=True)
class BeamSettings:
    num_beams: int
    max_new_tokens: int
    ends: frozenset[int]
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        if self.num_beams < 2:
            raise SparseftError(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise SparseftError(f"beam search needs max_new_tokens >= 1, got {self.max_new_tokens}")
        if self.early_stopping not in (True, False, "never"):
            raise SparseftError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, K, ...) at index (B, J) along dim 1: (B, J, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(
    first_logits: torch.Tensor,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    settings: BeamSettings,
    logits_filter: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """The best hypothesis of each input, its new tokens only (an end token last where it ended on one).

    `first_logits` (B, V): the logits after each input's prompt. `step(rows, tokens)` decodes one token per beam:
    it first keeps, in cache row i, what row `rows[i]` held (both (B N,), row b N + j is beam j of input b), then
    feeds `tokens` and returns their logits (B N, V). `logits_filter(step, log_probs)` changes each step's
    log-probabilities (suppressed tokens to -inf)."""
    batch, vocab = first_logits.shape
    beams, new = settings.num_beams, settings.max_new_tokens
    keep = max(2, 1 + len(settings.ends)) * beams  # enough that N run on even if the best N all end
    ends = torch.tensor(sorted(settings.ends), dtype=torch.long)
    first_n = torch.arange(keep) < beams  # the top N of the K continuations may finish
    offsets = torch.arange(batch)[:, None] * beams

    running = torch.zeros(batch, beams, new, dtype=torch.long)
    running_scores = torch.zeros(batch, beams)
    running_scores[:, 1:] = _NEVER
    done = torch.zeros(batch, beams, new, dtype=torch.long)
    done_scores = torch.full((batch, beams), _NEVER)
    done_lengths = torch.zeros(batch, beams, dtype=torch.long)
    finished = torch.zeros(batch, beams, dtype=torch.bool)
    improvable = torch.ones(batch, 1, dtype=torch.bool)
    penalty = settings.length_penalty

    logits = first_logits.repeat_interleave(beams, 0)
    for t in range(new):
        log_probs = functional.log_softmax(logits.float(), dim=-1)
        if logits_filter is not None:
            log_probs = logits_filter(t, log_probs)
        scores = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, -1)
        top_scores, top = torch.topk(scores, keep)
        source, token = top // vocab, top % vocab
        candidates = _gather(running, source)
        candidates[:, :, t] = token
        ended = torch.isin(token, ends) | (t + 1 == new)

        # the best N that did not just end run on
        blocked = top_scores + ended.float() * _NEVER
        chosen = torch.topk(blocked, beams).indices
        running = _gather(candidates, chosen)
        running_scores = _gather(blocked, chosen)
        rows = (_gather(source, chosen) + offsets).flatten()

        # those of the top N that just ended join the finished, if they beat them
        final = top_scores / ((t + 1) ** penalty)
        full = finished.all(-1, keepdim=True) & (settings.early_stopping is True)
        final = final + full.float() * _NEVER
        final = final + (~improvable).float() * _NEVER
        final = final + (~(ended & first_n)).float() * _NEVER
        merged = torch.topk(torch.cat([done_scores, final], 1), beams).indices
        done = _gather(torch.cat([done, candidates], 1), merged)
        done_scores = _gather(torch.cat([done_scores, final], 1), merged)
        done_lengths = _gather(torch.cat([done_lengths, torch.full((batch, keep), t + 1)], 1), merged)
        finished = _gather(torch.cat([finished, ended & first_n], 1), merged)

        length = new if settings.early_stopping == "never" and penalty > 0.0 else t + 1
        best_possible = running_scores[:, :1] / (length**penalty)
        worst = torch.where(finished, done_scores.min(1, keepdim=True).values, _NEVER)
        improvable = improvable & (best_possible > worst).any(-1, keepdim=True)
        all_full = bool(finished.all()) and settings.early_stopping is True
        if not bool(improvable.any()) or all_full or bool(ended.all()):
            break
        logits = step(rows, running[:, :, t].flatten())
    return [done[b, 0, : done_lengths[b, 0]] for b in range(batch)]
