"""The sparse fine-tuning loop, on accelerate: `accelerate launch` runs it on several processes (DDP) or sharded
(FSDP); a plain `python` call runs it in one process.

One optimizer step, in order:
    every micro-batch: student forward (+ teacher forward without grad) -> loss terms -> backward
    zero the gradients of pruned entries -> clip -> AdamW step -> LR schedule step -> re-apply the masks

Data order is a seeded permutation per epoch; each step takes the next global batch from it and each process its
own slice of that batch, so a step is fully described by its number: a checkpoint stores the step, the weights,
the optimizer, the schedule and the RNG, and `--resume` continues from the newest one that reads back (falling
back to the one before a damaged one), provided the setup that gives step numbers their meaning (processes,
batch sizes, seed, data rows, schedule) is unchanged. The loss of a step is the mean of
the micro-batch losses over all micro-batches of all processes, so one process with `grad_accum` = k x n sees the
same loss and gradient as n processes with `grad_accum` = k.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft.data.batch import collate, model_inputs
from sparseft.data.tasks import Row
from sparseft.errors import SparseftError
from sparseft.finetuning.checkpoints import Checkpoint, restore, save_checkpoint
from sparseft.finetuning.config import TrainConfig
from sparseft.finetuning.distributed import is_sharded, reduce_mean, reduce_sum
from sparseft.finetuning.losses import LossWeights, distill_terms
from sparseft.finetuning.masks import SparseMasks, pruned_weights


@dataclass
class Schedule:
    """Which rows each process reads at each step."""

    rows: int
    micro_batch_size: int
    grad_accum: int
    processes: int
    seed: int

    @classmethod
    def of(cls, cfg: TrainConfig, rows: int, processes: int) -> Schedule:
        return cls(rows, cfg.micro_batch_size, cfg.grad_accum, processes, cfg.seed)

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch  # the last partial batch of an epoch is dropped

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.rows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        mine = order[index * self.global_batch : (index + 1) * self.global_batch]
        per_process = self.micro_batch_size * self.grad_accum
        mine = mine[rank * per_process : (rank + 1) * per_process]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_process, self.micro_batch_size)]


def total_steps(cfg: TrainConfig, schedule: Schedule) -> int:
    if schedule.steps_per_epoch == 0:
        raise SparseftError(
            f"the task data has {schedule.rows} rows, fewer than one global batch of {schedule.global_batch} "
            "(micro_batch_size x grad_accum x processes); use more data or a smaller batch"
        )
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * schedule.steps_per_epoch))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norms, biases and other vectors are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)


def make_scheduler(optimizer: Any, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then linear decay to 0 at `total` (the paper's schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_terms(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, torch.Tensor],
    weights: LossWeights,
    bf16: bool,
) -> dict[str, torch.Tensor]:
    """Forward the student (and the teacher, without grad) on one micro-batch and compute the loss terms.

    Hidden states exist only inside this call: the teacher's are dropped when it returns, the student's once
    backward has run.
    """
    inputs = model_inputs(batch)
    hidden = weights.squarehead > 0
    device = next(iter(batch.values())).device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        out = model(**inputs, output_hidden_states=hidden, use_cache=False)
        teacher_out = None
        if teacher is not None and weights.needs_teacher:
            # Without KD the teacher's logits are never read: its backbone alone gives the block outputs, which
            # saves the (batch x tokens x vocabulary) logits, the largest tensor of its forward.
            runner = teacher if weights.kd > 0 else getattr(teacher, "base_model", teacher)
            with torch.no_grad():
                teacher_out = runner(**inputs, output_hidden_states=hidden, use_cache=False)
    return distill_terms(out, teacher_out, batch, weights)


def setup_of(cfg: TrainConfig, schedule: Schedule) -> dict[str, Any]:
    """What the step number of a checkpoint stands for: which rows each step reads, and the LR schedule. The
    optimizer state restores the old learning rate whatever the config says, so a changed lr is one too."""
    return {
        "processes": schedule.processes,
        "micro_batch_size": schedule.micro_batch_size,
        "grad_accum": schedule.grad_accum,
        "seed": schedule.seed,
        "rows": schedule.rows,
        "total_steps": total_steps(cfg, schedule),
        "warmup_steps": cfg.warmup_steps,
        "lr": cfg.lr,
    }


@dataclass
class StageResult:
    model: nn.Module  # as prepared by accelerate (wrapped under DDP/FSDP)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    sparsity: float = 0.0


def check_sparsity(accelerator: Any, masks: SparseMasks, expected_zeros: int, where: str) -> float:
    """Fail loudly unless every pruned entry is exactly zero and the masks still cover every pruned entry;
    return the sparsity of the masked weights."""
    violations = reduce_sum(accelerator, masks.violations())
    zeros = masks.zeros()
    numel = sum(m.numel() for m in masks.keep)
    if is_sharded(accelerator):
        zeros, numel = reduce_sum(accelerator, zeros), reduce_sum(accelerator, numel)
    if violations or zeros != expected_zeros:
        raise SparseftError(
            f"sparsity dropped {where}: {violations} pruned weights are no longer zero and the masks cover "
            f"{zeros} of {expected_zeros} pruned entries; the masks are not acting on the trained parameters"
        )
    return zeros / numel if numel else 0.0


def train_stage(
    accelerator: Any,
    student: nn.Module,
    teacher: nn.Module | None,
    rows: list[Row],
    pad_id: int,
    weights: LossWeights,
    cfg: TrainConfig,
    checkpoint_root: Path,
    resume_from: Checkpoint | None = None,
    progress: bool = True,
    writer: Any = None,
    label: str = "finetune",
) -> StageResult:
    """Fine-tune `student` in place with its zeros fixed. `resume_from`: a checkpoint whose weights `student`
    already holds (its setup checked when it was read); its optimizer, schedule, RNG and step are restored here."""
    expected = pruned_weights(student)
    schedule = Schedule.of(cfg, len(rows), accelerator.num_processes)
    total = total_steps(cfg, schedule)
    setup = setup_of(cfg, schedule)
    student.train()
    model, optimizer = accelerator.prepare(student, make_optimizer(student, cfg))
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, total)
    masks = SparseMasks.build(model, optimizer, expected, sharded=is_sharded(accelerator))
    expected_zeros = sum(expected.values())
    sparsity = check_sparsity(accelerator, masks, expected_zeros, "before training")  # shown until re-checked
    if teacher is not None:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher.eval()
        teacher.requires_grad_(False)

    start, history = 0, []
    if resume_from is None:
        # dropout and any other random op follow the seed, not the caller's RNG state (resuming restores it)
        torch.manual_seed(cfg.seed + accelerator.process_index)
    else:
        restore(resume_from, optimizer, scheduler)
        state = resume_from.state
        if state["expected_zeros"] != expected_zeros:
            raise SparseftError(
                f"checkpoint {resume_from.path} has {expected_zeros} zeros in pruned weights, its state says "
                f"{state['expected_zeros']}; it was written by another run"
            )
        start, history = state["step"], state["history"]

    bf16 = cfg.mixed_precision == "bf16"
    bar = tqdm(total=total, initial=start, desc=label, disable=not (progress and accelerator.is_main_process))
    for step in range(start, total):
        micro = schedule.micro_batches(step, accelerator.process_index)
        sums: dict[str, float] = {}
        for k, indices in enumerate(micro):
            batch = {
                key: t.to(accelerator.device)
                for key, t in collate([rows[i] for i in indices], pad_id).items()
            }
            sync = k == len(micro) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                terms = loss_terms(model, teacher, batch, weights, bf16)
                accelerator.backward(terms["loss"] / len(micro))
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach()) / len(micro)
            del terms, batch
        masks.zero_grads()  # before clipping: pruned entries must not count in the gradient norm
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        masks.apply()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            record = {
                "stage": label,
                "step": done,
                **reduce_mean(accelerator, sums),
                "lr": scheduler.get_last_lr()[0],
            }
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            history.append(record)
            shown = {k: f"{v:.4g}" for k, v in record.items() if k not in ("stage", "step")}
            bar.set_postfix({**shown, "sparsity": f"{sparsity:.2%}"}, refresh=False)
            if writer is not None:
                for key, scalar in record.items():
                    if key not in ("stage", "step"):
                        writer.add_scalar(f"{label}/{key}", scalar, done)
        if done % cfg.save_every == 0 or done == total:
            sparsity = check_sparsity(accelerator, masks, expected_zeros, f"at step {done}")
            state = {
                "step": done,
                "total_steps": total,
                "setup": setup,
                "expected_zeros": expected_zeros,
                "history": history,
            }
            save_checkpoint(accelerator, model, optimizer, scheduler, checkpoint_root, state, cfg.keep_last)
        bar.update(1)
    bar.close()
    sparsity = check_sparsity(accelerator, masks, expected_zeros, "at the end")
    return StageResult(model, total, history, sparsity)
