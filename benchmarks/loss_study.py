"""The paper's central comparison at small scale: which loss recovers a one-shot pruned model best?

    .venv/bin/python benchmarks/loss_study.py [--output runs/loss_study] [--workers 2] [--quick]

1. Teacher: an 8-block Llama (the bundled task's shipped tokenizer) pretrained on broad offline text: Python's
   standard library source and many grade-school problems, of the full number range and of the task's range, as
   web text holds math (other seeds than the task set; train split only, so never a test question). Then
   fine-tuned with CE on a small task set (`task_problems` problems with every number <= `max_value`). The
   students see only that small set: what the teacher learned beyond it reaches them only through distillation,
   the regime of the paper (a pretrained LLM fine-tuned on GSM8K's 7.5k problems).
2. SparseGPT one-shot at each sparsity, calibrated on task text: the "before fine-tuning" column.
3. Sparse fine-tuning from each one-shot model with the mask fixed, at one budget for every loss (`finetune_epochs`
   over the small task set): CE, KD (1 CE + 1 KD), SquareHead (1 CE + 1 SquareHead), KD + SquareHead
   (1 CE + 1 KD + 1 SquareHead), each with several seeds (the seed orders the data); and a sweep of the SquareHead
   weight at `sweep_sparsity`.
4. Held-out accuracy of every model with `sparseft.api.eval_gsm8k` (zero-shot, greedy, exact match of the final
   number) on `test_problems` problems of the test split, which never shares a question with any train split.

Every step is the public API (`sparseft.api`). Resumable: each finished model and each evaluated run is kept in the
output directory (results/<run>.json) and skipped on a rerun; a rerun with other sizes needs another --output.
Prints the table (mean +- std over seeds) and writes loss_study.json, loss_study.png and summary.md; a full-size
study also writes its summary to benchmarks/results/ (one committed file per run).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from sparseft import api
from sparseft.data import mathtask
from sparseft.demo.tiny import save_task_llama
from sparseft.io import atomic_dir, write_json
from sparseft.runtime.bench import cpu_name, result_path


@dataclass(frozen=True)
class StudySize:
    """Sizes and budgets. The default was sized to finish in about an hour on 2 cores (see docs/RESULTS.md)."""

    hidden: int = 128
    layers: int = 8
    max_value: int = 50  # difficulty of the task set: every number of a problem <= this
    pretrain_python_chars: int = 300_000
    pretrain_problems: int = 8_000  # full-range problems in the pretraining text
    pretrain_task_like: int = 8_000  # problems of the task's range in the pretraining text
    pretrain_epochs: float = 1.0
    pretrain_lr: float = 3e-3
    task_problems: int = 1_000  # the small task set: the teacher's and every student's training data
    test_problems: int = 500
    teacher_epochs: float = 5.0
    teacher_lr: float = 2e-3
    finetune_epochs: float = 2.0
    finetune_lr: float = 5e-4
    warmup_steps: int = 10
    batch_size: int = 16
    seqlen: int = 256
    calib_samples: int = 64
    max_new_tokens: int = 128  # the longest worked answer at max_value 50 is about 120 tokens
    eval_batch_size: int = 128
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9)
    seeds: tuple[int, ...] = (0, 1, 2)
    sweep_sparsity: float = 0.8
    sweep_weights: tuple[float, ...] = (0.1, 10.0)  # SquareHead weights besides the main grid's 1.0


QUICK = StudySize(
    hidden=64,
    layers=2,
    pretrain_python_chars=30_000,
    pretrain_problems=100,
    pretrain_task_like=100,
    task_problems=64,
    test_problems=8,
    teacher_epochs=1.0,
    finetune_epochs=1.0,
    warmup_steps=1,
    batch_size=8,
    calib_samples=4,
    max_new_tokens=8,
    eval_batch_size=8,
    sparsities=(0.5, 0.9),
    seeds=(0, 1),
    sweep_sparsity=0.9,
    sweep_weights=(10.0,),
)

# The compared losses as `api.finetune` settings; weights are the paper's (1 CE + 1 of the distillation term).
LOSSES: dict[str, dict[str, Any]] = {
    "CE": {"loss": "ce"},
    "KD": {"loss": "kd"},
    "SquareHead": {"loss": "squarehead"},
    "KD+SquareHead": {"loss": "kd", "loss__squarehead": 1.0},
}


@dataclass(frozen=True)
class Run:
    """One sparse fine-tuning run (or, with `loss` None, the one-shot model itself), evaluated."""

    sparsity: float
    loss: str | None
    seed: int = 0
    squarehead_weight: float | None = None  # only for the sweep: 1 CE + this x SquareHead

    @property
    def label(self) -> str:
        if self.loss is None:
            return "one-shot"
        if self.squarehead_weight is not None:
            return f"SquareHead x{self.squarehead_weight:g}"
        return self.loss

    @property
    def key(self) -> str:
        name = self.label.replace(" ", "").replace("+", "-")
        return f"s{round(100 * self.sparsity)}-{name}-seed{self.seed}"

    def settings(self) -> dict[str, Any]:
        if self.squarehead_weight is not None:
            return {"loss": "squarehead", "loss__squarehead": self.squarehead_weight}
        assert self.loss is not None
        return LOSSES[self.loss]


@dataclass
class Paths:
    root: Path
    data: Path = field(init=False)
    results: Path = field(init=False)

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.results = self.root / "results"

    def pruned(self, sparsity: float) -> Path:
        return self.root / f"pruned-{round(100 * sparsity)}"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher" / "model"


# --- the teacher ------------------------------------------------------------------------------------------------


def write_data(paths: Paths, size: StudySize) -> None:
    """The small task set, the test set, task text for calibration, and the pretraining text (as JSONL)."""
    from sparseft.demo.tiny import python_corpus

    if (paths.data / "pretrain.jsonl").is_file():
        return
    with atomic_dir(paths.data) as tmp:
        mathtask.write_dataset(tmp / "task", size.task_problems, size.test_problems, 0, size.max_value)
        for split in mathtask.SPLITS:
            (tmp / "task" / f"{split}.jsonl").rename(tmp / f"{split}.jsonl")
        (tmp / "task").rmdir()
        task = mathtask.generate(size.task_problems, "train", 0, size.max_value)
        template = "Question: {question}\nAnswer: "  # DataConfig's default: the layout the models train on
        calibration = [template.format(question=r["question"]) + r["answer"] for r in task]
        (tmp / "calibration.txt").write_text("\n\n".join(calibration))
        # Other seeds than the task set's: the teacher meets the task set's problems only in its fine-tuning.
        broad = mathtask.generate(size.pretrain_problems, "train", seed=1)
        broad += mathtask.generate(size.pretrain_task_like, "train", seed=2, max_value=size.max_value)
        in_task = {r["question"] for r in task}  # another seed can still draw a few of the same problems
        broad = [r for r in broad if r["question"] not in in_task]
        random.Random(0).shuffle(broad)
        texts = ["\n\n".join(f"Question: {r['question']}\nAnswer: {r['answer']}" for r in broad[i : i + 20])
                 for i in range(0, len(broad), 20)]  # fmt: skip
        texts += python_corpus(size.pretrain_python_chars)
        mathtask.write_jsonl([{"text": t} for t in texts], tmp / "pretrain.jsonl")


def train(model: Path | str, output: Path, dataset: Path, size: StudySize, **settings: Any) -> None:
    """One `api.finetune` run with the study's batch and sequence length, checkpointing only at the end."""
    api.finetune(
        str(model),
        output,
        dataset=str(dataset),
        data__seqlen=size.seqlen,
        train__micro_batch_size=size.batch_size,
        train__save_every=1_000_000,
        train__keep_last=1,
        overwrite=True,
        progress=False,
        **settings,
    )
    shutil.rmtree(output / "checkpoints", ignore_errors=True)  # optimizer state: only needed to resume


def build_teacher(paths: Paths, size: StudySize, log: Any) -> None:
    """Pretrain on the broad text (causal LM on every token, packed), then fine-tune on the task set with CE."""
    pretrained = paths.root / "pretrain" / "model"
    if not (pretrained / "config.json").is_file():
        started = time.perf_counter()
        train(
            save_task_llama(paths.root / "init", size.hidden, size.layers),
            paths.root / "pretrain",
            paths.data / "pretrain.jsonl",
            size,
            loss="ce",
            data__format="text",
            data__packing=True,
            train__epochs=size.pretrain_epochs,
            train__lr=size.pretrain_lr,
            train__warmup_steps=size.warmup_steps,
        )
        log(f"pretraining: {time.perf_counter() - started:.0f} s")
    if not (paths.teacher / "config.json").is_file():
        started = time.perf_counter()
        train(
            pretrained,
            paths.teacher.parent,
            paths.data / "train.jsonl",
            size,
            loss="ce",
            train__epochs=size.teacher_epochs,
            train__lr=size.teacher_lr,
            train__warmup_steps=size.warmup_steps,
        )
        log(f"teacher fine-tuning: {time.perf_counter() - started:.0f} s")


def prune_all(paths: Paths, size: StudySize) -> None:
    for sparsity in sorted({*size.sparsities, size.sweep_sparsity}):
        if (paths.pruned(sparsity) / "sparsity.json").is_file():
            continue
        api.prune(
            str(paths.teacher),
            paths.pruned(sparsity),
            method="sparsegpt",
            sparsity=sparsity,
            dataset=str(paths.data / "calibration.txt"),
            num_samples=size.calib_samples,
            seqlen=size.seqlen,
            overwrite=True,
            progress=False,
        )


# --- the runs ---------------------------------------------------------------------------------------------------


def accuracy(model: Path, paths: Paths, size: StudySize) -> dict[str, Any]:
    result = api.eval_gsm8k(
        str(model),
        str(paths.data / "test.jsonl"),
        split="test",
        limit=size.test_problems,
        batch_size=size.eval_batch_size,
        max_new_tokens=size.max_new_tokens,
        progress=False,
    )
    return {"accuracy": result["accuracy"], "correct": result["correct"], "total": result["total"]}


def plan(size: StudySize) -> list[Run]:
    """Every fine-tuning run, seed by seed, so that a stopped study already holds whole seeds."""
    runs = []
    for seed in size.seeds:
        for sparsity in size.sparsities:
            runs += [Run(sparsity, loss, seed) for loss in LOSSES]
        runs += [Run(size.sweep_sparsity, "SquareHead", seed, w) for w in size.sweep_weights]
    return runs


def do_run(run: Run, root: str, size: StudySize) -> dict[str, Any]:
    """Fine-tune (unless one-shot) and evaluate one run; runs in a worker process."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a spawned worker starts with the defaults
    torch.set_num_threads(1)  # see `study`
    paths = Paths(Path(root))
    started, cpu_started = time.perf_counter(), time.process_time()
    record: dict[str, Any] = {**asdict(run), "label": run.label}
    model = paths.pruned(run.sparsity)
    if run.loss is not None:
        directory = paths.root / "runs" / run.key
        train(
            model,
            directory,
            paths.data / "train.jsonl",
            size,
            teacher=str(paths.teacher),
            train__epochs=size.finetune_epochs,
            train__lr=size.finetune_lr,
            train__warmup_steps=size.warmup_steps,
            train__seed=run.seed,
            **run.settings(),
        )
        metrics = json.loads((directory / "metrics.json").read_text())
        record["steps"] = metrics["stages"][-1]["steps"]
        record["final_losses"] = {
            k: v for k, v in metrics["history"][-1].items() if k not in ("stage", "step")
        }
        record["train_seconds"] = round(time.perf_counter() - started, 1)
        model = directory / "model"
    record.update(accuracy(model, paths, size))
    if run.loss is not None:
        shutil.rmtree(model)  # 7 MB per run; metrics.json and loss.png stay
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    return record


def run_all(paths: Paths, size: StudySize, workers: int, log: Any) -> None:
    """Every pending run on `workers` processes, each result written as soon as it is done."""
    runs = [Run(s, None) for s in size.sparsities] + plan(size)
    pending = [r for r in runs if not (paths.results / f"{r.key}.json").is_file()]
    log(
        f"{len(runs) - len(pending)} of {len(runs)} runs already done; {len(pending)} to go on {workers} workers"
    )
    paths.results.mkdir(exist_ok=True)
    started, done = time.perf_counter(), 0
    # spawn, not fork: the parent has already run OpenMP-threaded training, which a forked child can hang on.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(do_run, r, str(paths.root), size): r for r in pending}
        for future in as_completed(futures):
            record = future.result()
            write_json(paths.results / f"{futures[future].key}.json", record)
            done += 1
            per_run = (time.perf_counter() - started) / done
            left = per_run * (len(pending) - done)
            log(
                f"[{done}/{len(pending)}] {futures[future].key}: {record['accuracy']:.1%} in {record['seconds']:.0f} s"
                f" (cpu {record['cpu_seconds']:.0f} s); about {left / 60:.0f} min left"
            )


# --- the report -------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def collect(paths: Paths, size: StudySize) -> dict[str, Any]:
    records = [json.loads(p.read_text()) for p in sorted(paths.results.glob("*.json"))]
    dense = json.loads((paths.root / "dense.json").read_text())
    by_cell: dict[tuple[str, float], list[float]] = {}
    for r in records:
        by_cell.setdefault((r["label"], r["sparsity"]), []).append(r["accuracy"])
    cells = {
        f"{label} @ {sparsity:.0%}": {
            "label": label,
            "sparsity": sparsity,
            "n": len(v),
            "mean": mean_std(v)[0],
            "std": mean_std(v)[1],
        }
        for (label, sparsity), v in sorted(by_cell.items(), key=lambda kv: (kv[0][1], kv[0][0]))
    }
    # Every loss shares CE's seeds (the data order) and test problems, so per-seed differences against CE cancel
    # the noise the two runs have in common: a tighter comparison than two independent means.
    ce = {(r["sparsity"], r["seed"]): r["accuracy"] for r in records if r["label"] == "CE"}
    diffs: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if r["label"] not in ("CE", "one-shot") and (r["sparsity"], r["seed"]) in ce:
            diff = r["accuracy"] - ce[(r["sparsity"], r["seed"])]
            diffs.setdefault((r["label"], r["sparsity"]), []).append(diff)
    for (label, sparsity), v in diffs.items():
        cells[f"{label} @ {sparsity:.0%}"]["vs_ce_mean"], cells[f"{label} @ {sparsity:.0%}"]["vs_ce_std"] = (
            mean_std(v)
        )
    return {"size": asdict(size), "dense": dense, "cells": cells, "runs": records}


def table(summary: dict[str, Any], size: StudySize) -> str:
    cells = summary["cells"]
    labels = ["one-shot", *LOSSES]
    head = "| sparsity | " + " | ".join(labels) + " |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    lines.append(f"| dense | {100 * summary['dense']['accuracy']:.1f} |" + " |" * (len(labels) - 1))
    for sparsity in size.sparsities:
        row = []
        for label in labels:
            cell = cells.get(f"{label} @ {sparsity:.0%}")
            if cell is None:
                row.append("-")
            elif cell["n"] == 1 and label == "one-shot":
                row.append(f"{100 * cell['mean']:.1f}")
            else:
                row.append(f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f} (n={cell['n']})")
        lines.append(f"| {sparsity:.0%} | " + " | ".join(row) + " |")
    sweep = [
        c
        for c in cells.values()
        if c["label"].startswith("SquareHead") and c["sparsity"] == size.sweep_sparsity
    ]
    if sweep:
        lines += ["", f"SquareHead weight at {size.sweep_sparsity:.0%} (1 CE + w x SquareHead):", ""]
        lines += ["| w | accuracy |", "|---|---|"]
        weights = {"SquareHead": 1.0} | {f"SquareHead x{w:g}": w for w in size.sweep_weights}
        for label, w in sorted(weights.items(), key=lambda kv: kv[1]):
            cell = cells.get(f"{label} @ {size.sweep_sparsity:.0%}")
            if cell is not None:
                lines.append(
                    f"| {w:g} | {100 * cell['mean']:.1f} ± {100 * cell['std']:.1f} (n={cell['n']}) |"
                )
    compared = [c for c in cells.values() if "vs_ce_mean" in c]
    if compared:
        lines += ["", "Difference to CE, same seed (points, mean ± std over seeds):", ""]
        lines += ["| sparsity | loss | minus CE |", "|---|---|---|"]
        for c in sorted(compared, key=lambda c: (c["sparsity"], c["label"])):
            lines.append(
                f"| {c['sparsity']:.0%} | {c['label']} | {100 * c['vs_ce_mean']:+.1f} ± {100 * c['vs_ce_std']:.1f} |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, Any], size: StudySize, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    fig, (ax, sweep_ax) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    xs = [100 * s for s in size.sparsities]
    for label in ["one-shot", *LOSSES]:
        found = [cells.get(f"{label} @ {s:.0%}") for s in size.sparsities]
        points = [(x, c) for x, c in zip(xs, found, strict=True) if c is not None]
        if points:
            ax.errorbar(
                [p[0] for p in points],
                [100 * p[1]["mean"] for p in points],
                yerr=[100 * p[1]["std"] for p in points],
                marker="o",
                capsize=3,
                label=label,
                linestyle="--" if label == "one-shot" else "-",
            )
    ax.axhline(100 * summary["dense"]["accuracy"], color="gray", linestyle=":", label="dense teacher")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"SparseGPT one-shot, then sparse fine-tuning (mean ± std, {len(size.seeds)} seeds)")
    ax.legend(fontsize=8)
    weights = [(1.0, "SquareHead")] + [(w, f"SquareHead x{w:g}") for w in size.sweep_weights]
    found_w = [(w, cells.get(f"{label} @ {size.sweep_sparsity:.0%}")) for w, label in sorted(weights)]
    found_w = [(w, c) for w, c in found_w if c is not None]
    if found_w:
        sweep_ax.errorbar(
            [w for w, _ in found_w],
            [100 * c["mean"] for _, c in found_w],
            yerr=[100 * c["std"] for _, c in found_w],
            marker="o",
            capsize=3,
        )
        sweep_ax.set_xscale("log")
    sweep_ax.set_xlabel("SquareHead weight (with 1 CE)")
    sweep_ax.set_title(f"SquareHead weight at {size.sweep_sparsity:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command ------------------------------------------------------------------------------------------------


def study(output: Path, size: StudySize, workers: int, result_file: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    paths = Paths(output)
    paths.root.mkdir(parents=True, exist_ok=True)
    size_file = paths.root / "size.json"
    if size_file.is_file() and json.loads(size_file.read_text()) != json.loads(json.dumps(asdict(size))):
        raise SystemExit(f"{output} holds a study of other sizes ({size_file}); choose another --output")
    write_json(size_file, asdict(size))
    log_file = paths.root / "study.log"

    def log(message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        print(line, flush=True)
        with log_file.open("a") as f:
            f.write(line + "\n")

    # One thread: on a shared 2-core machine a second OpenMP thread that loses its core stalls every matmul.
    torch.set_num_threads(1)
    write_data(paths, size)
    build_teacher(paths, size, log)
    if not (paths.root / "dense.json").is_file():
        write_json(paths.root / "dense.json", accuracy(paths.teacher, paths, size))
    log(f"dense teacher: {json.loads((paths.root / 'dense.json').read_text())['accuracy']:.1%}")
    prune_all(paths, size)
    run_all(paths, size, workers, log)
    summary = collect(paths, size)
    summary["seconds_this_call"] = round(time.perf_counter() - started, 1)
    summary["cpu_seconds_all_runs"] = round(sum(r.get("cpu_seconds", 0.0) for r in summary["runs"]), 1)
    text = table(summary, size)
    print(text)
    write_json(paths.root / "loss_study.json", summary)
    if result_file:
        write_json(Path(result_file), {"machine": cpu_name(), "date": time.strftime("%Y-%m-%d"), **summary})
        log(f"written to {result_file}")
    plot(summary, size, paths.root / "loss_study.png")
    (paths.root / "summary.md").write_text(text + "\n")
    log(f"done in {summary['seconds_this_call'] / 60:.1f} min (this call)")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/loss_study")
    parser.add_argument(
        "--workers", type=int, default=2, help="fine-tuning runs in parallel (one thread each)"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every step runs")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.disable_progress_bar()
    result_file = None if args.quick else result_path("loss_study")
    study(Path(args.output), QUICK if args.quick else StudySize(), args.workers, result_file)


if __name__ == "__main__":
    main()
