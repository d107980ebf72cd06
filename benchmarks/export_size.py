"""Size on disk and export/load time of sparseft's export formats, on a 70% sparse Llama-shaped model.

    .venv/bin/python benchmarks/export_size.py [--repeats 3] [--output PATH]

The model has Llama-124M-like shapes (hidden 768, intermediate 2048, 12 layers, 12 heads, vocab 32000), random
weights in bf16, magnitude-pruned to 70% in every linear of the blocks. Sizes are measured on disk: the pruned
layers (all tensors that encode them: values, bitmask, row offsets, shape, scales) against the same layers dense
in bf16, and the whole checkpoint against the dense bf16 HF checkpoint. Ideal ratios at 70%: bitmask + bf16
0.3625, + int8 0.2125, + int4 0.1375 (plus scales). Export and load times alternate between formats across
repeats and the medians are reported (timings on a shared machine are noisy; compare the ratios).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import sparseft
from sparseft.hf import find_targets, weight_matrix
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.runtime.bench import result_path

SPARSITY = 0.7
VARIANTS: list[tuple[str, str, str | None]] = [
    ("bitmask + bf16", "bitmask", None),
    ("bitmask + int8", "bitmask", "int8"),
    ("bitmask + int4 (g128)", "bitmask", "int4"),
    ("hf + int8 (compressed-tensors)", "hf", "int8"),
    ("hf + int4 (compressed-tensors)", "hf", "int4"),
]
TARGETS = {"bitmask + bf16": 0.37, "bitmask + int8": 0.22, "bitmask + int4 (g128)": 0.16}


def make_pruned_checkpoint(directory: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = find_targets(model)
    with torch.no_grad():
        for module in targets.values():
            weight = weight_matrix(module)
            weight.copy_(magnitude_prune(weight, SPARSITY))
    model.save_pretrained(directory)
    layer_weights = sum(weight_matrix(m).numel() for m in targets.values())
    return {"parameters": sum(p.numel() for p in model.parameters()), "layer_weights": layer_weights}


def disk_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="export/load runs per format (medians reported)"
    )
    parser.add_argument("--output", help="JSON results (default: benchmarks/results/, dated)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sparseft-export-bench-"))
    try:
        source = work / "pruned"
        shape = make_pruned_checkpoint(source)
        dense_layer_bytes = 2 * shape["layer_weights"]
        dense_model_bytes = disk_size(source)
        times: dict[str, dict[str, list[float]]] = {
            name: {"export": [], "load": []} for name, _, _ in VARIANTS
        }
        rows: dict[str, dict[str, Any]] = {}
        for repeat in range(args.repeats):
            for name, fmt, quantize in VARIANTS:  # alternate formats within each repeat
                out = work / f"{fmt}-{quantize}"
                started = time.perf_counter()
                sparseft.export(str(source), out, fmt, quantize, 128, overwrite=True, progress=False)
                times[name]["export"].append(time.perf_counter() - started)
                started = time.perf_counter()
                sparseft.load(out)
                times[name]["load"].append(time.perf_counter() - started)
                if repeat == 0:
                    info = sparseft.api.info(out)
                    rows[name] = {
                        "layers_bytes": info["layers_bytes"],
                        "layers_ratio": info["layers_bytes"] / dense_layer_bytes,
                        "layers_bytes_per_weight": info["layers_bytes_per_weight"],
                        "model_bytes": info["size_on_disk"],
                        "model_ratio": info["size_on_disk"] / dense_model_bytes,
                        "target": TARGETS.get(name),
                    }
        for name, row in rows.items():
            row["export_seconds"] = statistics.median(times[name]["export"])
            row["load_seconds"] = statistics.median(times[name]["load"])
            row["export_runs"], row["load_runs"] = times[name]["export"], times[name]["load"]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"Llama-shaped model: {shape['parameters'] / 1e6:.1f}M parameters, {shape['layer_weights'] / 1e6:.1f}M in "
        f"pruned layers at {SPARSITY:.0%}; dense bf16: layers {dense_layer_bytes / 1e6:.1f} MB, "
        f"checkpoint {dense_model_bytes / 1e6:.1f} MB"
    )
    header = f"{'format':<32} {'layers MB':>9} {'layers x':>9} {'target':>7} {'B/weight':>9} {'model x':>8}"
    print(header + f" {'export s':>9} {'load s':>7}")
    for name, row in rows.items():
        target = f"<={row['target']}" if row["target"] else ""
        print(
            f"{name:<32} {row['layers_bytes'] / 1e6:>9.1f} {row['layers_ratio']:>9.4f} {target:>7} "
            f"{row['layers_bytes_per_weight']:>9.4f} {row['model_ratio']:>8.4f} "
            f"{row['export_seconds']:>9.2f} {row['load_seconds']:>7.2f}"
        )
    result = {
        "model": "llama hidden 768, intermediate 2048, 12 layers, vocab 32000, bf16, random weights",
        "sparsity": SPARSITY,
        **shape,
        "dense_layer_bytes_bf16": dense_layer_bytes,
        "dense_checkpoint_bytes": dense_model_bytes,
        "repeats": args.repeats,
        "formats": rows,
    }
    output = Path(args.output or result_path("export_size"))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
