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
import json
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from sparseft import modelcard, seq2seq_data
from sparseft.atomic import atomic_dir, write_json
from sparseft.distill import LossWeights, distill_terms
from sparseft.errors import SparseftError, SparseftWarning
from sparseft.models import (
    find_blocks,
    find_targets,
    load_model,
    load_tokenizer,
    max_positions,
    read_config,
    weight_matrix,
)
from sparseft.pruning.sequential import prune_model
from sparseft.recipe import FinetuneConfig, PruneConfig, TrainConfig
from sparseft.sparsemask import SparseMasks, local, pruned_weights
from sparseft.taskdata import Row, build_rows, calibration_windows, check_packing, collate, model_inputs

T = TypeVar("T")

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
REPORT_FILE = "finetune.json"


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


# --- checkpoints ----------------------------------------------------------------------------------------------


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary directories start with a dot)."""
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix("step-")))


def remove_temporaries(root: Path) -> None:
    """Remove what a save killed midway left under `root`: `.step-N.tmp-*` (never renamed into place) and
    `.step-N.old-*` (a replaced checkpoint not yet deleted)."""
    if root.is_dir():
        for path in [*root.glob(".step-*.tmp-*"), *root.glob(".step-*.old-*")]:
            shutil.rmtree(path, ignore_errors=True)


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


def check_setup(path: Path, saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse to resume `path` under another setup: it would silently read other rows or follow another schedule.
    Checkpoints written before the setup was recorded (`saved` None) are not checked."""
    if saved is None:
        return
    for key, value in current.items():
        if key in saved and saved[key] != value:
            raise SparseftError(
                f"checkpoint {path} was written with {key} = {saved[key]} but this run has {value}; "
                f"set it back to {saved[key]} to resume, or start again in another --output"
            )


def save_checkpoint(
    accelerator: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    root: Path,
    state: dict[str, Any],
    keep_last: int,
) -> None:
    """Write `root/step-N` atomically: weights (safetensors), optimizer + schedule + RNG (tensors only), and the
    trainer state (step, setup, expected zeros, history) as JSON; then drop all but the last `keep_last`.

    The optimizer state is written once when every process holds the same (DDP), and once per process when each
    holds its own shard (FSDP). Older checkpoints are deleted only once the new one is on disk (flushed, renamed,
    the rename flushed), so a crash or power loss at any point leaves a complete checkpoint to resume from."""
    weights = accelerator.get_state_dict(model)  # every process takes part (FSDP gathers the shards)
    main, sharded = accelerator.is_main_process, _is_sharded(accelerator)
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(root / f"step-{state['step']}")) if main else None
        shared = [str(tmp) if tmp else None]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(shared)
        where = Path(str(shared[0]))
        torch.save(_rng_state(), where / f"rng-{accelerator.process_index}.pt")
        if main or sharded:
            name = f"optimizer-{accelerator.process_index}.pt" if sharded else OPTIMIZER_FILE
            saved = {"optimizer": local_optimizer_state(optimizer), "scheduler": scheduler.state_dict()}
            torch.save(saved, where / name)
        if main:
            accelerator.unwrap_model(model).save_pretrained(
                where, state_dict=weights, safe_serialization=True
            )
            write_json(where / STATE_FILE, state)
        accelerator.wait_for_everyone()  # every process has written its files before atomic_dir flushes them
    if main:
        for old in checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


@dataclass
class Checkpoint:
    """A checkpoint read back whole, before anything of it is used."""

    path: Path
    model: nn.Module
    state: dict[str, Any]  # trainer_state.json
    saved: dict[str, Any]  # the optimizer and scheduler state dicts
    rng: dict[str, Any] | None


class _Damaged(Exception):
    """A file of a checkpoint does not read back (truncated, garbled, missing)."""


def read_checkpoint(
    path: Path, process_index: int, setup: dict[str, Any], load_weights: Callable[[str], nn.Module]
) -> Checkpoint:
    """Read what this process needs from `path`. Raises `_Damaged` when a file does not read back, and
    SparseftError when the checkpoint was written under another setup (checked first: a changed number of
    processes would otherwise show as a missing optimizer file)."""
    state = _reading(STATE_FILE, lambda: json.loads((path / STATE_FILE).read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _Damaged(f"{STATE_FILE}: no step in it")
    check_setup(path, state.get("setup"), setup)
    own = path / f"optimizer-{process_index}.pt"
    optimizer_file = own if own.is_file() else path / OPTIMIZER_FILE
    rng_file = path / f"rng-{process_index}.pt"
    model = _reading("weights", lambda: load_weights(str(path)))
    # weights_only: tensors and plain containers, no pickled code
    saved = _reading(optimizer_file.name, lambda: torch.load(optimizer_file, weights_only=True))
    rng = None
    if rng_file.is_file():
        rng = _reading(rng_file.name, lambda: torch.load(rng_file, weights_only=True))
    return Checkpoint(path, model, state, saved, rng)


def latest_checkpoint(
    accelerator: Any, root: Path, setup: dict[str, Any], load_weights: Callable[[str], nn.Module]
) -> Checkpoint | None:
    """The newest checkpoint under `root` that reads back on every process, or None if there is none. A damaged
    one is named in a warning and the one before it is tried."""
    found = checkpoints(root)
    for path in reversed(found):
        checkpoint, problem = None, None
        try:
            checkpoint = read_checkpoint(path, accelerator.process_index, setup, load_weights)
        except _Damaged as e:
            problem = str(e)
        if _reduce_sum(accelerator, int(problem is not None)) == 0:  # all processes resume from the same step
            return checkpoint
        if problem is not None:
            then = "; trying the one before it" if path != found[0] else ""
            warnings.warn(
                f"checkpoint {path} cannot be loaded ({problem}){then}", SparseftWarning, stacklevel=2
            )
    if found:
        raise SparseftError(
            f"no checkpoint in {root} can be loaded (see the warnings above); remove that directory to start the "
            "stage again"
        )
    return None


def restore(checkpoint: Checkpoint, optimizer: Any, scheduler: Any) -> None:
    """Put the optimizer, schedule and RNG of `checkpoint` in place (its weights are already the model's)."""
    # popped, so that the copy read from disk is freed once the optimizer holds the state
    load_local_optimizer_state(optimizer, checkpoint.saved.pop("optimizer"))
    scheduler.load_state_dict(checkpoint.saved.pop("scheduler"))
    if checkpoint.rng is not None:
        _set_rng_state(checkpoint.rng)


def _reading(name: str, read: Callable[[], T]) -> T:
    try:
        return read()
    except Exception as e:  # a damaged file fails in many ways: JSON, unpickling, zip, safetensors, EOF
        reason, text = type(e).__name__, str(e).strip()
        if text:  # the first sentence: torch appends paragraphs of advice
            reason += ": " + text.splitlines()[0].split(". ")[0]
        raise _Damaged(f"{name}: {reason}") from e


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with sharded (DTensor) entries replaced by this process's shard, so that it
    holds plain tensors only and reads back with `torch.load(weights_only=True)`."""
    saved = optimizer.state_dict()
    saved["state"] = {i: {k: local(v) for k, v in entry.items()} for i, entry in saved["state"].items()}
    return saved


def load_local_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> None:
    """Inverse of `local_optimizer_state`: shards go back into DTensors laid out like their parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in saved["state"].items():
        param = params[int(index)]
        mesh = getattr(param, "device_mesh", None)
        if mesh is None:
            continue
        from torch.distributed.tensor import DTensor

        for key, value in entry.items():
            if value.shape == local(param.data).shape and value.ndim > 0:
                entry[key] = DTensor.from_local(
                    value, mesh, param.placements, shape=param.shape, stride=param.stride()
                )
    optimizer.load_state_dict(saved)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- the loop -------------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    model: nn.Module  # as prepared by accelerate (wrapped under DDP/FSDP)
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    sparsity: float = 0.0


def _reduce_mean(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    if accelerator.num_processes == 1:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], device=accelerator.device)
    tensor = accelerator.reduce(tensor, reduction="mean")
    return dict(zip(keys, tensor.tolist(), strict=True))


def _reduce_sum(accelerator: Any, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    return int(accelerator.reduce(torch.tensor([value], device=accelerator.device), reduction="sum").item())


def _is_sharded(accelerator: Any) -> bool:
    return "FSDP" in str(accelerator.distributed_type)


def check_sparsity(accelerator: Any, masks: SparseMasks, expected_zeros: int, where: str) -> float:
    """Fail loudly unless every pruned entry is exactly zero and the masks still cover every pruned entry;
    return the sparsity of the masked weights."""
    violations = _reduce_sum(accelerator, masks.violations())
    zeros = masks.zeros()
    numel = sum(m.numel() for m in masks.keep)
    if _is_sharded(accelerator):
        zeros, numel = _reduce_sum(accelerator, zeros), _reduce_sum(accelerator, numel)
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
    masks = SparseMasks.build(model, optimizer, expected, sharded=_is_sharded(accelerator))
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
                **_reduce_mean(accelerator, sums),
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


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """A loss-curve PNG: one line per logged term, against the step counted across stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [k for k in ("loss", "ce", "kd", "squarehead") if any(k in r for r in history)]
    offsets: list[int] = []
    base, last_stage = 0, None
    for record in history:
        if record["stage"] != last_stage and offsets:
            base = offsets[-1]
        last_stage = record["stage"]
        offsets.append(base + record["step"])
    for name in names:
        points = [(x, r[name]) for x, r in zip(offsets, history, strict=True) if name in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("optimizer step (all stages)")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the stages -----------------------------------------------------------------------------------------------


def check_teacher(student: nn.Module, teacher: nn.Module, weights: LossWeights) -> None:
    """The teacher must speak the student's vocabulary (KD) and have its blocks and width (SquareHead)."""
    s_type, t_type = student.config.model_type, teacher.config.model_type  # type: ignore[union-attr]
    if s_type != t_type:
        raise SparseftError(
            f"teacher is a {t_type} model but the student is {s_type}; distil from the same architecture"
        )
    s_vocab = student.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]  # type: ignore[operator]
    if s_vocab != t_vocab:
        raise SparseftError(
            f"teacher has a vocabulary of {t_vocab} tokens, the student {s_vocab}; they must match"
        )
    if weights.squarehead > 0:
        s_blocks, t_blocks = len(find_blocks(student)[1]), len(find_blocks(teacher)[1])
        s_width = student.get_input_embeddings().weight.shape[1]  # type: ignore[operator]
        t_width = teacher.get_input_embeddings().weight.shape[1]  # type: ignore[operator]
        if (s_blocks, s_width) != (t_blocks, t_width):
            raise SparseftError(
                f"SquareHead compares block outputs, but the teacher has {t_blocks} blocks of width {t_width} and the "
                f"student {s_blocks} of width {s_width}; use the dense model the student was pruned from"
            )


def prune_stage(model: nn.Module, cfg: PruneConfig, rows: list[Row], device: Any, progress: bool) -> None:
    """One-shot prune `model` in place, calibrated on random windows of the task data."""
    settings = cfg.settings()
    targets = find_targets(model, cfg.targets or None, cfg.ignore)
    if settings.structure is not None:
        for name, module in targets.items():
            settings.structure.check_columns(weight_matrix(module).shape[1], name)
    samples: Any = None
    if settings.method != "magnitude":
        if isinstance(rows[0], seq2seq_data.Example):  # encoder-decoder: whole examples, not token windows
            examples = cast(list[seq2seq_data.Example], rows)
            dtype = next(model.parameters()).dtype
            samples = seq2seq_data.calibration_samples(examples, cfg.num_samples, cfg.seed, dtype)
        else:
            samples = calibration_windows(rows, cfg.num_samples, cfg.seqlen, cfg.seed)
    prune_model(model, targets, settings, samples, device=device, progress=progress)


def _check_lengths(model: nn.Module, cfg: FinetuneConfig) -> None:
    limit = max_positions(model.config)
    if limit is None:
        return
    if cfg.data.seqlen > limit:
        raise SparseftError(
            f"data seqlen {cfg.data.seqlen} is longer than the model allows ({limit}); use --seqlen {limit}"
        )
    if cfg.data.format in seq2seq_data.SEQ2SEQ_FORMATS:
        return  # their prune stages calibrate on whole examples, not on windows of `seqlen` tokens
    for stage in cfg.stages:
        if stage.prune is not None and stage.prune.seqlen > limit:
            raise SparseftError(
                f"stage {stage.name}: calibration seqlen {stage.prune.seqlen} is longer than the model allows "
                f"({limit}); set seqlen: {limit} or less under the stage's prune:"
            )


def _tensorboard_writer(wanted: bool, main: bool) -> Any:
    """TensorBoard's SummaryWriter class, or None when no log is written (other processes, or not asked for)."""
    if not (wanted and main):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SparseftError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


def run_finetune(
    cfg: FinetuneConfig,
    output: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage of `cfg` (prune, then fine-tune with the mask fixed) and write into `output`:
    `model/` (the last stage's model), `stage-<i>-<name>/` (earlier stages), `checkpoints/`, `metrics.json` and
    `loss.png`. Everything that can be checked is checked before the first step."""
    from accelerate import Accelerator

    if cfg.model is None:
        raise SparseftError("no student model: pass --model (a hub id or a local directory)")
    output = Path(output)
    if output.exists() and not resume and not overwrite:
        raise SparseftError(
            f"output {output} already exists; pass --resume to continue its run, --overwrite to start again, "
            "or choose another --output"
        )
    # Without a GPU, accelerate only forms a process group (gloo) when told it runs on CPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    trains = [cfg.stage_train(stage) for stage in cfg.stages]
    weights = cfg.loss.weights()
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    student_config = read_config(cfg.model, cfg.trust_remote_code)
    if cfg.data.format in seq2seq_data.SEQ2SEQ_FORMATS:  # T5 translation, Whisper speech
        # Examples batch through `taskdata.collate` and calibrate prune stages like rows do.
        examples = seq2seq_data.finetune_examples(cfg.model, tokenizer, cfg.data, cfg.trust_remote_code)
        rows = cast(list[Row], examples)
    else:
        rows = build_rows(tokenizer, cfg.data)
    student: nn.Module | None = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code)
    assert student is not None
    _check_lengths(student, cfg)
    if cfg.data.format not in seq2seq_data.SEQ2SEQ_FORMATS:  # their examples are never packed
        check_packing(student, cfg.data)
    teacher = None
    if (
        weights.needs_teacher and cfg.teacher is not None
    ):  # the config requires a teacher for KD and SquareHead
        teacher = load_model(cfg.teacher, cfg.dtype, cfg.trust_remote_code)
        check_teacher(student, teacher, weights)
    for train_cfg in trains:
        total_steps(train_cfg, Schedule.of(train_cfg, len(rows), accelerator.num_processes))
    summary_writer = _tensorboard_writer(any(t.tensorboard for t in trains), accelerator.is_main_process)
    if overwrite and not resume and accelerator.is_main_process and output.exists():
        shutil.rmtree(output)
    accelerator.wait_for_everyone()
    output.mkdir(parents=True, exist_ok=True)
    writer = summary_writer(str(output / "tensorboard")) if summary_writer else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    reports: list[dict[str, Any]] = []
    previous = cfg.model
    names = [s.name for s in cfg.stages]
    for i, (stage, train_cfg) in enumerate(zip(cfg.stages, trains, strict=True)):
        target = output / ("model" if i == len(names) - 1 else f"stage-{i}-{stage.name}")
        root = output / "checkpoints" / f"{i}-{stage.name}"
        if accelerator.is_main_process:
            remove_temporaries(root)
        if resume and (target / REPORT_FILE).is_file():  # finished before the run was stopped
            try:
                reports.append(json.loads((target / REPORT_FILE).read_text()))
            except (OSError, ValueError) as e:
                raise SparseftError(
                    f"{target / REPORT_FILE} of a finished stage does not read back ({type(e).__name__}); delete "
                    f"{target} and resume to run that stage again"
                ) from None
            previous, student = str(target), None
            continue
        resumed = None
        if resume:
            setup = setup_of(train_cfg, Schedule.of(train_cfg, len(rows), accelerator.num_processes))
            resumed = latest_checkpoint(
                accelerator, root, setup, lambda path: load_model(path, cfg.dtype, cfg.trust_remote_code)
            )
        if resumed is not None:
            student = resumed.model
        else:
            if student is None:
                student = load_model(previous, cfg.dtype, cfg.trust_remote_code)
            if stage.prune is not None:
                prune_stage(student, stage.prune, rows, accelerator.device, progress)
        result = train_stage(
            accelerator,
            student,
            teacher,
            rows,
            pad_id,
            weights,
            train_cfg,
            root,
            resumed,
            progress,
            writer,
            stage.name,
        )
        report = {
            "stage": stage.name,
            "index": i,
            "steps": result.steps,
            "sparsity": result.sparsity,
            "loss_weights": asdict(weights),
            "train": train_cfg.model_dump(mode="json"),
            "prune": stage.prune.model_dump(mode="json") if stage.prune else None,
            "history": result.history,
        }
        state_dict = accelerator.get_state_dict(result.model)
        if accelerator.is_main_process:
            with atomic_dir(target) as tmp:
                accelerator.unwrap_model(result.model).save_pretrained(
                    tmp, state_dict=state_dict, safe_serialization=True
                )
                tokenizer.save_pretrained(tmp)
                seq2seq_data.save_feature_extractor(cfg.model, student_config, tmp, cfg.trust_remote_code)
                write_json(tmp / REPORT_FILE, report)
                modelcard.write_card(
                    tmp,
                    previous,
                    target,
                    teacher=cfg.teacher,
                    dataset=cfg.data.dataset,
                    trust_remote_code=cfg.trust_remote_code,
                )
        accelerator.wait_for_everyone()
        reports.append(report)
        previous, student = str(target), None
        del result, state_dict, resumed
        accelerator.free_memory()

    history = [record for report in reports for record in report["history"]]
    summary = {
        "model": str(output / "model"),
        "teacher": cfg.teacher,
        "data": cfg.data.model_dump(mode="json"),
        "stages": [{k: v for k, v in r.items() if k != "history"} for r in reports],
        "history": history,
    }
    if accelerator.is_main_process:
        write_json(output / "metrics.json", summary)
        if history:
            plot_losses(history, output / "loss.png")
    if writer is not None:
        writer.close()
    return summary
