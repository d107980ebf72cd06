"""Pruning quality: held-out perplexity of a small Llama-style model, dense vs magnitude, Wanda and SparseGPT at
50%, 2:4 and 70%. The model is trained here for a few minutes on Python's standard library source (offline) and
cached in the output directory, so later runs skip training.

    .venv/bin/python benchmarks/prune_quality.py [--output runs/bench-prune-quality]

Expected order at 70%: SparseGPT <= Wanda < magnitude. Prints the table and writes results JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from sparseft import api
from sparseft.data.text import token_stream
from sparseft.demo.tiny import pretrain, python_corpus, tiny_config, train_tokenizer
from sparseft.io import atomic_dir, write_json


@dataclass(frozen=True)
class StudySize:
    hidden: int = 256
    layers: int = 4
    vocab: int = 2048
    corpus_chars: int = 4_000_000
    steps: int = 600
    seqlen: int = 256
    batch_size: int = 16
    calib_samples: int = 64


SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("50%", {"sparsity": 0.5}),
    ("2:4", {"structure": "2:4"}),
    ("70%", {"sparsity": 0.7}),
]


def prepare_text(output: Path, size: StudySize) -> tuple[Path, Path]:
    """Split the corpus by file into train (90%) and held-out (10%) text files."""
    texts = python_corpus(size.corpus_chars)
    cut = max(1, len(texts) // 10)
    train, test = output / "train.txt", output / "heldout.txt"
    if not train.exists():
        train.write_text("\n\n".join(texts[cut:]))
        test.write_text("\n\n".join(texts[:cut]))
    return train, test


def train_dense(model_dir: Path, train_text: Path, size: StudySize) -> None:
    """Train the dense model once; a finished model directory is reused as a cache."""
    if (model_dir / "config.json").exists():
        return
    text = train_text.read_text()
    tokenizer = train_tokenizer([text], size.vocab)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=size.hidden, layers=size.layers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    losses = pretrain(model, token_stream(tokenizer, [text]), size.steps, size.seqlen, size.batch_size)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_losses.json", losses)


def prune_study(output: Path, size: StudySize) -> dict[str, Any]:
    """Train (or reuse) the dense model, prune it every way, return the perplexity rows."""
    output.mkdir(parents=True, exist_ok=True)
    train_text, heldout = prepare_text(output, size)
    dense_dir = output / "dense"
    started = time.perf_counter()
    train_dense(dense_dir, train_text, size)

    def ppl(model_dir: Path) -> float:
        result = api.eval_ppl(str(model_dir), str(heldout), seqlen=size.seqlen, batch_size=8, progress=False)
        return float(result["perplexity"])

    rows: list[dict[str, Any]] = [
        {"method": "dense", "setting": "-", "perplexity": ppl(dense_dir), "seconds": 0.0}
    ]
    for label, setting in SETTINGS:
        for method in ("magnitude", "wanda", "sparsegpt"):
            out = output / f"{method}-{label.replace(':', 'of').replace('%', '')}"
            report = api.prune(
                str(dense_dir),
                out,
                method=method,
                dataset=str(train_text),
                num_samples=size.calib_samples,
                seqlen=size.seqlen,
                overwrite=True,
                progress=False,
                **setting,
            )
            rows.append(
                {"method": method, "setting": label, "perplexity": ppl(out), "seconds": report["seconds"]}
            )
    return {"size": asdict(size), "rows": rows, "total_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-prune-quality")
    parser.add_argument(
        "--steps", type=int, default=StudySize.steps, help="training steps of the dense model"
    )
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    result = prune_study(Path(args.output), StudySize(steps=args.steps))
    print("| method | sparsity | held-out perplexity | prune time (s) |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['method']} | {r['setting']} | {r['perplexity']:.2f} | {r['seconds']:.1f} |")
    at70 = {r["method"]: r["perplexity"] for r in result["rows"] if r["setting"] == "70%"}
    result["order_at_70"] = at70["sparsegpt"] <= at70["wanda"] < at70["magnitude"]
    print(
        f"70%: sparsegpt {at70['sparsegpt']:.2f} <= wanda {at70['wanda']:.2f} < magnitude {at70['magnitude']:.2f}: "
        f"{result['order_at_70']}"
    )
    Path(args.output, "prune_quality.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
