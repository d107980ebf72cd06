"""Pruning quality: held-out perplexity of a small GPT-style model, dense vs magnitude, Wanda and SparseGPT at
50%, 2:4 and 70%. The model is trained here for a few minutes on Python's standard library source (offline).

    .venv/bin/python benchmarks/prune_quality.py [--output runs/bench-prune-quality]

Expected order at 70%: SparseGPT <= Wanda < magnitude. Prints the table and writes results JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparseft.demo import DemoSize, run_demo

BENCH = DemoSize(
    hidden=256,
    layers=4,
    vocab=2048,
    corpus_chars=4_000_000,
    steps=600,
    seqlen=256,
    batch_size=16,
    calib_samples=64,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench-prune-quality")
    args = parser.parse_args()
    result = run_demo(args.output, size=BENCH)
    at70 = {r["method"]: r["perplexity"] for r in result["rows"] if r["setting"] == "70%"}
    result["order_at_70"] = at70["sparsegpt"] <= at70["wanda"] < at70["magnitude"]
    print(
        f"70%: sparsegpt {at70['sparsegpt']:.2f} <= wanda {at70['wanda']:.2f} < magnitude {at70['magnitude']:.2f}: "
        f"{result['order_at_70']}"
    )
    Path(args.output, "prune_quality.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
