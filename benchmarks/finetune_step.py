"""Training-step time and peak memory of SquareHead distillation against CE alone, on the same model and batch.

    .venv/bin/python benchmarks/finetune_step.py [--repeats 7] [--output benchmarks/results/finetune_step.json]

One step is what `sparseft.finetuning.loop` does per optimizer step: student forward (and, for SquareHead, the dense
teacher's forward without grad, both with hidden states), the loss terms, backward, gradient masking, clipping,
AdamW, re-masking. The student is a Llama-shaped model (hidden 512, 4 blocks, vocab 8192) pruned to 70% by
magnitude; the teacher is its dense original; the batch is 8 rows of 256 tokens. The two kinds of step alternate
within one run and the medians are compared (target: SquareHead / CE <= 1.5x). Peak memory: on CPU the rise of the
process's peak resident set over one step (the peak is reset before each step through /proc/self/clear_refs); on
CUDA, torch.cuda.max_memory_allocated over one step.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from sparseft.finetuning.loop import loss_terms
from sparseft.finetuning.losses import LossWeights
from sparseft.finetuning.masks import SparseMasks, pruned_weights
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune

KINDS = {"ce": LossWeights(ce=1.0), "squarehead": LossWeights(ce=1.0, squarehead=1.0)}


def build(device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        vocab_size=8192, max_position_embeddings=512,
    )  # fmt: skip
    teacher = transformers.LlamaForCausalLM(config).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for module in find_targets(student).values():
            weight = weight_matrix(module)
            weight.copy_(magnitude_prune(weight, 0.7, None))
    return student.to(device).train(), teacher.to(device).requires_grad_(False)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of the block it wraps, in MiB, above what was in use when it started."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
            self.start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = (peak - self.start) / 2**20


def step(student, teacher, optimizer, masks, batch, weights) -> None:
    terms = loss_terms(student, teacher, batch, weights, bf16=False)
    terms["loss"].backward()
    masks.zero_grads()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    masks.apply()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="benchmarks/results/finetune_step.json")
    args = parser.parse_args()

    student, teacher = build(args.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, weight_decay=0.01)
    masks = SparseMasks.build(student, optimizer, pruned_weights(student), sharded=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, student.config.vocab_size, (args.batch, args.seqlen), generator=gen)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    batch = {k: v.to(args.device) for k, v in batch.items()}

    for weights in KINDS.values():  # warm-up: allocator, AdamW state, kernels
        step(student, teacher, optimizer, masks, batch, weights)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    memory: dict[str, list[float]] = {k: [] for k in KINDS}
    for repeat in range(args.repeats):
        order = list(KINDS) if repeat % 2 == 0 else list(reversed(KINDS))  # alternate which goes first
        for kind in order:
            with PeakMemory(args.device) as peak:
                started = time.perf_counter()
                step(student, teacher, optimizer, masks, batch, KINDS[kind])
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[kind].append(time.perf_counter() - started)
            memory[kind].append(peak.mib)
    assert masks.violations() == 0

    median = {k: statistics.median(v) for k, v in times.items()}
    peak_mib = {k: statistics.median(v) for k, v in memory.items()}
    ratio = median["squarehead"] / median["ce"]
    report = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "model": "llama hidden 512, 4 blocks, vocab 8192, 70% magnitude-pruned student, dense teacher",
        "batch": [args.batch, args.seqlen],
        "repeats": args.repeats,
        "step_seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_seconds": median,
        "ratio_squarehead_over_ce": ratio,
        "peak_step_memory_mib": peak_mib,
        "memory_ratio_squarehead_over_ce": peak_mib["squarehead"] / peak_mib["ce"]
        if peak_mib["ce"]
        else None,
    }
    print(f"{'step':<12}{'median s':>10}{'peak MiB':>10}")
    for kind in KINDS:
        print(f"{kind:<12}{median[kind]:>10.4f}{peak_mib[kind]:>10.1f}")
    print(
        f"SquareHead / CE: time {ratio:.2f}x (target <= 1.5x), peak memory {report['memory_ratio_squarehead_over_ce']:.2f}x"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
