"""`sparseft demo`: the whole pipeline (prune, sparse fine-tune, export, run), offline, on the bundled math task.

    train a small dense model on the task (the teacher; cached) -> SparseGPT one-shot to 70% -> evaluate
    -> sparse fine-tune with SquareHead from the teacher -> evaluate -> export bitmask + int8 (or int4)
    -> decode speed of the runtime (SparseLinear) against dense bf16, side by side

Every step is the public API (`sparseft.api`), so this file is also the worked example of using it. The teacher
is trained from scratch with `finetune` (CE, no pruning): the design's "sparseft can produce the teacher itself".
With `model`/`dataset` the same pipeline starts from a real model and a GSM8K-style dataset instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import transformers

from sparseft import __version__, api
from sparseft.data import mathtask
from sparseft.data.records import is_local
from sparseft.data.tasks import DataConfig
from sparseft.demo.tiny import save_task_llama
from sparseft.errors import SparseftError
from sparseft.io import write_json


@dataclass(frozen=True)
class DemoSize:
    """Model size and budgets. The default fits the first run in about 15 minutes on 2 cores (see docs/DEMO.md)."""

    hidden: int = 256
    layers: int = 4
    max_value: int | None = 99  # the bundled task's difficulty: two-digit numbers, learnable in minutes
    train_problems: int = 20_000
    test_problems: int = 400
    teacher_steps: int = 1000
    teacher_lr: float = 3e-3
    finetune_steps: int = 250
    finetune_lr: float = 3e-4
    batch_size: int = 16
    seqlen: int = 256
    calib_samples: int = 64
    sparsity: float = 0.7
    max_new_tokens: int = 144  # the longest worked answer is about 125 tokens
    bench_prompt: int = 64
    bench_tokens: int = 64
    bench_runs: int = 3
    # bf16 autocast for training. Off by default: at this size it measured 1.3x slower than float32 (5.2 vs 3.9 s per
    # step, interleaved, batch 16, a new padded length every step), unlike on larger models.
    bf16: bool = False


# The values the demo's archive may take.
QUANTIZE = ("int8", "int4")

QUICK = DemoSize(
    hidden=64,
    layers=2,
    train_problems=300,
    test_problems=16,
    teacher_steps=8,
    finetune_steps=4,
    batch_size=8,
    calib_samples=4,
    max_new_tokens=16,
    bench_prompt=8,
    bench_tokens=4,
    bench_runs=1,
)


@dataclass(frozen=True)
class TaskData:
    """Where the task's records come from: train and test as (dataset, split) pairs for `finetune`/`evaluate`."""

    train: tuple[str, str]
    test: tuple[str, str]
    describe: str


def bundled_data(output: Path, size: DemoSize) -> TaskData:
    """The bundled generator's train and test splits, written once as JSONL (seeded, so always the same)."""
    data = output / "data"
    meta = {"train": size.train_problems, "test": size.test_problems, "seed": 0, "max_value": size.max_value}
    if not (data / "meta.json").is_file() or json.loads((data / "meta.json").read_text()) != meta:
        mathtask.write_dataset(
            data, size.train_problems, size.test_problems, seed=0, max_value=size.max_value
        )
        write_json(data / "meta.json", meta)
    return TaskData(
        (str(data / "train.jsonl"), "train"),
        (str(data / "test.jsonl"), "test"),
        f"bundled math task ({size.train_problems} train / {size.test_problems} test problems, numbers up to "
        f"{size.max_value or 'the full range'})",
    )


def task_data(dataset: str) -> TaskData:
    """A datasets name's train and test splits, or a local directory's train.jsonl and test.jsonl: one local file
    has no splits, and training and measuring on the same records would hide what the demo shows."""
    if not is_local(dataset):
        return TaskData((dataset, "train"), (dataset, "test"), f"{dataset} (train / test splits)")
    files = [Path(dataset).expanduser() / f"{split}.jsonl" for split in ("train", "test")]
    if not all(f.is_file() for f in files):
        raise SparseftError(
            f"--dataset {dataset}: a local dataset is a directory holding train.jsonl and test.jsonl (the demo "
            "fine-tunes on one and measures on the other), or pass a datasets name with train and test splits"
        )
    return TaskData(
        (str(files[0]), "train"), (str(files[1]), "test"), f"{dataset} (train.jsonl / test.jsonl)"
    )


def initial_model(output: Path, size: DemoSize) -> str:
    """A randomly initialised small Llama with the task's shipped tokenizer, saved as the teacher's start."""
    return str(save_task_llama(output / "init", size.hidden, size.layers))


def finetune(
    model: str, output: Path, data: TaskData, steps: int, lr: float, size: DemoSize, **options: Any
) -> dict[str, Any]:
    """One `sparseft finetune` run with the demo's settings (no intermediate checkpoints)."""
    return api.finetune(
        model,
        output,
        dataset=data.train[0],
        data__split=data.train[1],
        data__seqlen=size.seqlen,
        train__max_steps=steps,
        train__lr=lr,
        train__micro_batch_size=size.batch_size,
        train__warmup_steps=max(1, steps // 20),
        train__mixed_precision="bf16" if size.bf16 else "no",
        train__save_every=steps,
        train__keep_last=1,
        overwrite=True,
        **options,
    )


# Bumped when training rows are built differently (labels, EOS), so that a cached teacher is trained again.
ROWS_REVISION = 2


def teacher(output: Path, start: str, data: TaskData, size: DemoSize, progress: bool) -> str:
    """The dense teacher: `start` fine-tuned on the task with CE. Cached: reused while its inputs are the same."""
    run = output / "teacher"
    key = {
        "start": start,
        "start_files": _fingerprint(Path(start)),
        "data": data.describe,
        "train_file": _fingerprint(Path(data.train[0])),
        "size": asdict(size),
        "sparseft": __version__,
        "rows": ROWS_REVISION,
    }
    key_file = run / "demo_key.json"
    cached = (run / "model" / "config.json").is_file() and key_file.is_file()
    if cached and json.loads(key_file.read_text()) == key:
        return str(run / "model")
    lr = size.teacher_lr if start == str(output / "init") else size.finetune_lr  # from scratch vs pretrained
    finetune(start, run, data, size.teacher_steps, lr, size, loss="ce", progress=progress)
    write_json(key_file, key)
    return str(run / "model")


def _fingerprint(path: Path) -> str | None:
    """What changes when a local file or model directory is edited in place (its contents, or for a directory's
    weight files their sizes and times, which are cheaper to read); None for a hub name."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if path.is_dir():
        stats = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.glob("*.safetensors"))
        config = path / "config.json"
        return hashlib.sha256(
            repr((stats, config.read_bytes() if config.is_file() else b"")).encode()
        ).hexdigest()
    return None


def calibration_text(output: Path, data: TaskData, size: DemoSize) -> str:
    """Task problems laid out as the model sees them, as a text file for `prune --dataset`."""
    template = DataConfig(dataset=data.train[0]).prompt_template
    records = api.qa_records(data.train[0], split=data.train[1], limit=max(64, 4 * size.calib_samples))
    path = output / "data" / "calibration.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(template.format(question=r["question"]) + r["answer"] for r in records))
    return str(path)


def accuracy(model: str, data: TaskData, size: DemoSize, progress: bool, **options: Any) -> float:
    result = api.eval_gsm8k(
        model,
        data.test[0],
        split=data.test[1],
        limit=size.test_problems,
        batch_size=64,  # few large batches: decoding this small a model is per-step overhead
        max_new_tokens=size.max_new_tokens,
        progress=progress,
        **options,
    )
    return float(result["accuracy"])


def size_on_disk(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def run_demo(
    output: str | Path = "runs/demo",
    quick: bool = False,
    model: str | None = None,
    dataset: str | None = None,
    progress: bool = True,
    size: DemoSize | None = None,
    quantize: str = "int8",
) -> dict[str, Any]:
    """Run the pipeline into `output`; print the table; write demo.json, report.md and the plots. `quantize`: the
    exported archive's values, "int8" (per channel) or "int4" (a scale per 128 columns)."""
    if quantize not in QUANTIZE:
        raise SparseftError(f"the demo exports {' or '.join(QUANTIZE)} values, not {quantize!r}")
    if dataset is not None and model is None:
        raise SparseftError("--dataset needs --model: the bundled tiny model is trained for the bundled task")
    data = None
    if dataset is not None and dataset != mathtask.NAME:
        data = task_data(dataset)  # before anything is written
    with _no_loading_bars():
        return _run(Path(output), quick, model, data, progress, size, quantize)


@contextlib.contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' weight-loading bars off while the demo runs (its own lines say which step runs), and as they
    were after it: the demo may run inside a longer process (the tests, a notebook)."""
    shown = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers.utils.logging.enable_progress_bar()


def _run(
    output: Path,
    quick: bool,
    model: str | None,
    data: TaskData | None,
    progress: bool,
    size: DemoSize | None,
    quantize: str,
) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    size = size or (QUICK if quick else DemoSize())
    seconds: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        if progress:
            print(f"[demo] {name} ...", flush=True)
        value = step()
        seconds[name] = round(time.perf_counter() - started, 1)
        return value

    data = data or bundled_data(output, size)
    start = model or initial_model(output, size)
    dense = timed("teacher", lambda: teacher(output, start, data, size, progress))
    pruned = str(output / "pruned")
    calibration = calibration_text(output, data, size)
    timed(
        "prune",
        lambda: api.prune(
            dense,
            pruned,
            method="sparsegpt",
            sparsity=size.sparsity,
            dataset=calibration,
            num_samples=size.calib_samples,
            seqlen=size.seqlen,
            overwrite=True,
            progress=progress,
        ),
    )
    student_run = output / "student"
    timed(
        "finetune",
        lambda: finetune(
            pruned,
            student_run,
            data,
            size.finetune_steps,
            size.finetune_lr,
            size,
            teacher=dense,
            loss="squarehead",
            progress=progress,
        ),
    )
    recovered = str(student_run / "model")
    exported = output / "export"
    timed(
        "export",
        lambda: api.export(
            recovered, exported, "bitmask", quantize=quantize, overwrite=True, progress=progress
        ),
    )
    acc = timed(
        "evaluate",
        lambda: {
            "dense": accuracy(dense, data, size, progress),
            "pruned": accuracy(pruned, data, size, progress),
            "recovered": accuracy(recovered, data, size, progress),
            "runtime": accuracy(str(exported), data, size, progress, runtime=True),
        },
    )
    bench = timed(
        "benchmark",
        lambda: api.bench(exported, size.bench_prompt, size.bench_tokens, size.bench_runs)["results"],
    )
    sparse_key = next(k for k in bench if k.startswith("sparse"))
    result = {
        "data": data.describe,
        "model": model or "bundled tiny Llama trained from scratch",
        "size": asdict(size),
        "quantize": quantize,
        "accuracy": acc,
        "decode_tok_s": {
            "dense bf16": bench["dense bf16"]["decode_tok_s"],
            sparse_key: bench[sparse_key]["decode_tok_s"],
        },
        "bench": bench,
        "size_on_disk": {"dense": size_on_disk(dense), "export": size_on_disk(exported)},
        "dense_dtype": _stored_dtype(dense),
        "seconds": seconds,
        "machine": _machine(bench),
    }
    table = summary_table(result)
    print(table)
    write_json(output / "demo.json", result)
    write_report(output, result, table)
    return result


def _stored_dtype(model_dir: str) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _machine(bench: dict[str, Any]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # /proc/cpuinfo names the CPU on Linux only
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {"cpu": cpu, **bench.get("_machine", {})}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_table(result: dict[str, Any]) -> str:
    """The one table: accuracy of each model, decode speed and size of the dense and the shipped sparse one."""
    acc, speed, disk = result["accuracy"], result["decode_tok_s"], result["size_on_disk"]
    sparsity = f"{result['size']['sparsity']:.0%}"
    sparse_key = next(k for k in speed if k.startswith("sparse"))
    rows = [
        (
            "dense teacher",
            acc["dense"],
            f"{speed['dense bf16']:.1f} (bf16)",
            f"{_mb(disk['dense'])} ({result['dense_dtype']})",
        ),
        (f"SparseGPT {sparsity} one-shot", acc["pruned"], "", ""),
        ("+ SquareHead fine-tuning", acc["recovered"], "", ""),
        (
            f"exported bitmask {result.get('quantize', 'int8')}, runtime",
            acc["runtime"],
            f"{speed[sparse_key]:.1f} ({sparse_key.removeprefix('sparse ')})",
            _mb(disk["export"]),
        ),
    ]
    lines = ["| model | accuracy | decode tokens/s | size on disk |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.1%} | {s} | {d} |" for name, a, s, d in rows]
    ratio = speed[sparse_key] / speed["dense bf16"]
    lines.append(
        f"\nsparse/dense decode speed {ratio:.2f}x; size {disk['dense'] / disk['export']:.1f}x smaller"
    )
    return "\n".join(lines)


def write_plots(output: Path, result: dict[str, Any]) -> list[str]:
    """loss.png (teacher training and sparse fine-tuning), accuracy.png, speed.png; returns the file names."""
    # Imported here, as in `sparseft.finetuning.stages.plot_losses`: slow to import, and the backend must be
    # chosen before pyplot loads.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, run, title in zip(
        axes, ("teacher", "student"), ("teacher (CE)", "sparse fine-tuning"), strict=True
    ):
        history = json.loads((output / run / "metrics.json").read_text())["history"]
        for name in ("loss", "ce", "squarehead"):
            points = [(r["step"], r[name]) for r in history if name in r]
            if points and (name != "loss" or run == "student"):
                ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(output / "loss.png", dpi=100)
    plt.close(fig)

    acc = result["accuracy"]
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = ["dense", "one-shot", "fine-tuned", f"{result.get('quantize', 'int8')} runtime"]
    ax.bar(labels, [100 * acc[k] for k in ("dense", "pruned", "recovered", "runtime")])
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"held-out accuracy, {result['size']['sparsity']:.0%} sparse")
    fig.tight_layout()
    fig.savefig(output / "accuracy.png", dpi=100)
    plt.close(fig)

    speed = result["decode_tok_s"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(list(speed), list(speed.values()))
    ax.set_ylabel("decode tokens/s (batch 1)")
    fig.tight_layout()
    fig.savefig(output / "speed.png", dpi=100)
    plt.close(fig)
    return ["loss.png", "accuracy.png", "speed.png"]


def write_report(output: Path, result: dict[str, Any], table: str) -> None:
    plots = write_plots(output, result)
    machine = result["machine"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    text = [
        "# sparseft demo",
        "",
        f"Model: {result['model']}. Task: {result['data']}; accuracy is GSM8K-style exact match of the final "
        "number, greedy, zero-shot, on the test split.",
        "",
        table,
        "",
        f"Machine: {machine['cpu']}, {machine.get('threads')} threads, copy bandwidth {machine.get('copy_gb_s')} "
        f"GB/s, clock {machine.get('clock_ghz') or 'n/a'} GHz. Time per phase: {phases}. Decode speed: medians of alternating runs (prompt "
        f"{result['size']['bench_prompt']} tokens, {result['size']['bench_tokens']} new tokens).",
        "",
        *[f"![{p.removesuffix('.png')}]({p})" for p in plots],
        "",
        "Settings:",
        "",
        "```",
        json.dumps(result["size"], indent=2),
        "```",
        "",
    ]
    (output / "report.md").write_text("\n".join(text))
