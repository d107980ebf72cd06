"""What each deployable format costs in accuracy, measured through the runtime: dense, sparse bf16, sparse int8
(RTN and GPTQ), sparse int4 with a scale per 128 or per 32 input columns (RTN and GPTQ).

    .venv/bin/python benchmarks/quant_accuracy.py [--demo runs/demo] [--lm runs/bench-prune-quality]
                                                  [--lm-steps 600]
                                                  [--only task|lm]

Two models, each exported in every format as a bitmask archive and evaluated on the sparse runtime (the dense
model on transformers):
- task: the demo's fine-tuned 70% model (`make demo`; run here if it is not there yet), accuracy on the bundled
  math task's 400 test problems, greedy. GPTQ calibrates on the demo's calibration text.
- lm: prune_quality.py's small Llama trained on Python's standard library source (trained here once and
  cached), pruned to 70% with SparseGPT, held-out perplexity. GPTQ calibrates on the training text.
Prints a markdown table per model and writes benchmarks/results/quant_accuracy_<date>_<machine>.json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import transformers
from prune_quality import StudySize, prepare_text, train_dense

from sparseft import api
from sparseft.demo.pipeline import DemoSize, accuracy, bundled_data, run_demo
from sparseft.io import write_json
from sparseft.runtime.bench import cpu_name, linear_bits, result_path

# label: (quantize, group size, method)
FORMATS: dict[str, tuple[str | None, int | None, str]] = {
    "sparse bf16": (None, None, "rtn"),
    "sparse int8 RTN": ("int8", None, "rtn"),
    "sparse int8 GPTQ": ("int8", None, "gptq"),
    "sparse int4 g128 RTN": ("int4", 128, "rtn"),
    "sparse int4 g128 GPTQ": ("int4", 128, "gptq"),
    "sparse int4 g32 RTN": ("int4", 32, "rtn"),
    "sparse int4 g32 GPTQ": ("int4", 32, "gptq"),
}


def export_formats(model: Path, root: Path, calibration: Path, samples: int, seqlen: int) -> dict[str, Path]:
    """Every format of `model` as a bitmask archive under `root`."""
    out = {}
    for label, (quantize, group_size, method) in FORMATS.items():
        target = root / label.replace(" ", "-")
        api.export(
            str(model),
            target,
            "bitmask",
            quantize=quantize,
            group_size=group_size,
            method=method,
            dataset=str(calibration) if method == "gptq" else None,
            num_samples=samples,
            seqlen=seqlen,
            overwrite=True,
            progress=False,
        )
        out[label] = target
    return out


def bits_per_weight(archive: Path) -> float | None:
    """Bits the runtime reads per weight of the linears at decode, as it loads the archive."""
    model = api.load_sparse(archive)
    return linear_bits(model, int(model.config.vocab_size))


def measure(label: str, score: Any, archive: Path | None) -> dict[str, Any]:
    started = time.perf_counter()
    value = score()
    row = {"format": label, "score": value, "seconds": round(time.perf_counter() - started, 1)}
    row["bits_per_weight"] = bits_per_weight(archive) if archive is not None else 16.0
    print(
        f"  {label:<22} {value:.4f}  ({row['bits_per_weight']} bits/weight, {row['seconds']} s)", flush=True
    )
    return row


def task_study(demo_dir: Path) -> dict[str, Any]:
    size = DemoSize()
    if not (demo_dir / "student" / "model" / "config.json").is_file():
        print(
            f"no fine-tuned demo model in {demo_dir}: running the demo first (about 15 minutes)", flush=True
        )
        run_demo(demo_dir, progress=False)
    data = bundled_data(demo_dir, size)
    dense, recovered = demo_dir / "teacher" / "model", demo_dir / "student" / "model"
    archives = export_formats(recovered, demo_dir / "formats", demo_dir / "data" / "calibration.txt", 64, 256)
    print(f"task accuracy ({size.test_problems} problems, greedy):", flush=True)
    rows = [measure("dense (teacher)", lambda: accuracy(str(dense), data, size, False), None)]
    rows.append(measure("sparse, not exported", lambda: accuracy(str(recovered), data, size, False), None))
    rows[-1]["bits_per_weight"] = None  # dense storage of a sparse model: not a deployment format
    for label, archive in archives.items():
        rows.append(
            measure(label, lambda a=archive: accuracy(str(a), data, size, False, runtime=True), archive)
        )
    return {"metric": "accuracy", "problems": size.test_problems, "rows": rows}


def lm_study(output: Path, steps: int) -> dict[str, Any]:
    size = StudySize(steps=steps)
    output.mkdir(parents=True, exist_ok=True)
    train_text, heldout = prepare_text(output, size)
    dense = output / "dense"
    train_dense(dense, train_text, size)
    pruned = output / "sparsegpt-70"
    if not (pruned / "config.json").is_file():
        api.prune(
            str(dense),
            pruned,
            method="sparsegpt",
            sparsity=0.7,
            dataset=str(train_text),
            num_samples=size.calib_samples,
            seqlen=size.seqlen,
            overwrite=True,
            progress=False,
        )
    archives = export_formats(pruned, output / "formats", train_text, size.calib_samples, size.seqlen)

    def ppl(model: Path, runtime: bool) -> float:
        result = api.eval_ppl(
            str(model), str(heldout), seqlen=size.seqlen, batch_size=8, runtime=runtime, progress=False
        )
        return float(result["perplexity"])

    print("held-out perplexity:", flush=True)
    rows = [measure("dense", lambda: ppl(dense, False), None)]
    for label, archive in archives.items():
        rows.append(measure(label, lambda a=archive: ppl(a, True), archive))
    return {"metric": "perplexity", "train_steps": size.steps, "rows": rows}


def print_table(name: str, study: dict[str, Any]) -> None:
    print(f"\n{name}\n| format | {study['metric']} | bits/weight at decode |\n|---|---|---|")
    for r in study["rows"]:
        bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.2f}"
        print(f"| {r['format']} | {r['score']:.4f} | {bits} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo's output directory")
    parser.add_argument("--lm", default="runs/bench-prune-quality", help="the small LM's cache directory")
    parser.add_argument(
        "--lm-steps",
        type=int,
        default=StudySize.steps,
        help="training steps of the small LM (use a fresh --lm directory when changing it)",
    )
    parser.add_argument("--only", choices=["task", "lm"], help="run one of the two studies")
    parser.add_argument("--output", help="result JSON (default: benchmarks/results/, dated)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    result: dict[str, Any] = {"machine": cpu_name()}
    if args.only in (None, "task"):
        result["task"] = task_study(Path(args.demo))
    if args.only in (None, "lm"):
        result["lm"] = lm_study(Path(args.lm), args.lm_steps)
    result["seconds"] = round(time.perf_counter() - started, 1)
    for name in ("task", "lm"):
        if name in result:
            print_table(name, result[name])
    out = Path(args.output or result_path("quant_accuracy"))
    write_json(out, result)
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
