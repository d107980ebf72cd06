"""`sparseft demo`: the main job, offline, on the bundled default.

Trains a small Llama-architecture model on text every Python install carries (its standard library's source),
prunes it one-shot with magnitude, Wanda and SparseGPT, and compares held-out perplexity. The trained model is
cached in the output directory, so later runs skip training.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from sparseft import api
from sparseft.atomic import atomic_dir, write_json
from sparseft.data import token_stream
from sparseft.tiny import pretrain, python_corpus, tiny_config, train_tokenizer


@dataclass(frozen=True)
class DemoSize:
    hidden: int = 128
    layers: int = 4
    vocab: int = 1024
    corpus_chars: int = 1_500_000
    steps: int = 300
    seqlen: int = 128
    batch_size: int = 16
    calib_samples: int = 32


QUICK = DemoSize(
    hidden=64, layers=2, vocab=384, corpus_chars=100_000, steps=10, seqlen=64, batch_size=8, calib_samples=4
)

SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("50%", {"sparsity": 0.5}),
    ("2:4", {"structure": "2:4"}),
    ("70%", {"sparsity": 0.7}),
]


def prepare_text(output: Path, size: DemoSize) -> tuple[Path, Path]:
    """Split the corpus by file into train (90%) and held-out (10%) text files."""
    texts = python_corpus(size.corpus_chars)
    cut = max(1, len(texts) // 10)
    train, test = output / "train.txt", output / "heldout.txt"
    if not train.exists():
        train.write_text("\n\n".join(texts[cut:]))
        test.write_text("\n\n".join(texts[:cut]))
    return train, test


def train_dense(model_dir: Path, train_text: Path, size: DemoSize, progress: bool = True) -> None:
    """Train the dense model once; a finished model directory is reused as a cache."""
    if (model_dir / "config.json").exists():
        return
    text = train_text.read_text()
    tokenizer = train_tokenizer([text], size.vocab)
    config = tiny_config("llama", vocab_size=len(tokenizer), hidden=size.hidden, layers=size.layers)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    losses = pretrain(
        model, token_stream(tokenizer, [text]), size.steps, size.seqlen, size.batch_size, progress=progress
    )
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "train_losses.json", losses)


def run_demo(
    output: str | Path = "runs/demo", quick: bool = False, progress: bool = True, size: DemoSize | None = None
) -> dict[str, Any]:
    """Train (or reuse) the dense model, prune it every way, print and save the perplexity table."""
    transformers.utils.logging.disable_progress_bar()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    size = size or (QUICK if quick else DemoSize())
    train_text, heldout = prepare_text(output, size)
    dense_dir = output / "dense"
    started = time.perf_counter()
    train_dense(dense_dir, train_text, size, progress)

    def ppl(model_dir: Path) -> float:
        return float(
            api.eval_ppl(str(model_dir), str(heldout), seqlen=size.seqlen, batch_size=8, progress=False)[
                "perplexity"
            ]
        )

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

    lines = ["| method | sparsity | held-out perplexity | prune time (s) |", "|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['setting']} | {r['perplexity']:.2f} | {r['seconds']:.1f} |" for r in rows
    ]
    table = "\n".join(lines)
    print(table)
    result = {"size": asdict(size), "rows": rows, "total_seconds": round(time.perf_counter() - started, 1)}
    write_json(output / "demo.json", result)
    (output / "report.md").write_text(
        "# sparseft demo\n\nA small Llama-architecture model trained on Python's standard library source, pruned "
        f"one-shot; perplexity on held-out files.\n\n{table}\n\n```\n{json.dumps(asdict(size))}\n```\n"
    )
    return result
