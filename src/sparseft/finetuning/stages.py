"""The stages of a fine-tuning recipe, in order (what `sparseft finetune` runs): each optionally prunes the model
one-shot, calibrated on the task data, then fine-tunes it with its zeros fixed (`loop.train_stage`), distilling
from the dense teacher; each stage's model is saved before the next starts from it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

import torch
from accelerate import Accelerator
from torch import nn

from sparseft import modelcard
from sparseft.data import seq2seq
from sparseft.data.batch import task_calibration
from sparseft.data.tasks import Row, build_rows, check_packing
from sparseft.errors import SparseftError
from sparseft.finetuning.checkpoints import latest_checkpoint, remove_temporaries
from sparseft.finetuning.config import FinetuneConfig
from sparseft.finetuning.loop import Schedule, setup_of, total_steps, train_stage
from sparseft.finetuning.losses import LossWeights
from sparseft.hf import (
    find_blocks,
    find_targets,
    load_model,
    load_tokenizer,
    max_positions,
    read_config,
    weight_matrix,
)
from sparseft.io import atomic_dir, write_json
from sparseft.pruning.config import PruneConfig
from sparseft.pruning.sequential import prune_model

REPORT_FILE = "finetune.json"


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """A loss-curve PNG: one line per logged term, against the step counted across stages."""
    # Imported here: slow to import, only the last step of a run plots, and the backend must be chosen before
    # pyplot loads.
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
    """One-shot prune `model` in place, calibrated on the task data (`sparseft.data.batch.task_calibration`)."""
    settings = cfg.settings()
    targets = find_targets(model, cfg.targets or None, cfg.ignore)
    if settings.structure is not None:
        for name, module in targets.items():
            settings.structure.check_columns(weight_matrix(module).shape[1], name)
    samples: Any = None
    if settings.method != "magnitude":
        dtype = next(model.parameters()).dtype
        samples = task_calibration(rows, cfg.num_samples, cfg.seqlen, cfg.seed, dtype)
    prune_model(model, targets, settings, samples, device=device, progress=progress)


def _check_lengths(model: nn.Module, cfg: FinetuneConfig) -> None:
    limit = max_positions(model.config)
    if limit is None:
        return
    if cfg.data.seqlen > limit:
        raise SparseftError(
            f"data seqlen {cfg.data.seqlen} is longer than the model allows ({limit}); use --seqlen {limit}"
        )
    if cfg.data.format in seq2seq.SEQ2SEQ_FORMATS:
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
    if cfg.data.format in seq2seq.SEQ2SEQ_FORMATS:  # T5 translation, Whisper speech
        # Examples batch through `sparseft.data.batch.collate` and calibrate prune stages like rows do.
        examples = seq2seq.finetune_examples(cfg.model, tokenizer, cfg.data, cfg.trust_remote_code)
        rows = cast(list[Row], examples)
    else:
        rows = build_rows(tokenizer, cfg.data)
    student: nn.Module | None = load_model(cfg.model, cfg.dtype, cfg.trust_remote_code)
    assert student is not None
    _check_lengths(student, cfg)
    if cfg.data.format not in seq2seq.SEQ2SEQ_FORMATS:  # their examples are never packed
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
                seq2seq.save_feature_extractor(cfg.model, student_config, tmp, cfg.trust_remote_code)
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
