"""Pruning speed: SparseGPT 50% on a randomly initialised Llama-architecture model (hidden 768, intermediate
2048, 12 layers, vocab 32000) with 64 calibration sequences of 512 tokens. Reports wall time and peak resident
memory of the pruning step (targets: under 60 s and 2 GB), and a fp32 matmul probe measured in the same run.

    .venv/bin/python benchmarks/prune_speed.py [--dtype bfloat16] [--output runs/bench-prune-speed.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import transformers

from sparseft.hf import find_targets, parse_dtype
from sparseft.pruning.sequential import PruneSettings, prune_model


def matmul_gflops(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 768, dtype=dtype), torch.randn(768, 2048, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 2 * 2048 * 768 * 2048 * 10 / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", default="runs/bench-prune-speed.json")
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    config = transformers.LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    samples = torch.randint(0, 32000, (64, 512), generator=torch.Generator().manual_seed(0))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    probe_before = matmul_gflops(dtype)
    start = time.perf_counter()
    prune_model(model, find_targets(model), PruneSettings("sparsegpt", 0.5), samples)
    seconds = time.perf_counter() - start
    probe_after = matmul_gflops(dtype)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "dtype": args.dtype,
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "rss_before_prune_mb": round(rss_before),
        "threads": torch.get_num_threads(),
        "matmul_gflops_before_after": [round(probe_before), round(probe_after)],
    }
    print(json.dumps(result, indent=2))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
