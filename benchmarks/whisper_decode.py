"""Whisper decoding on the CPU: sparseft's own Whisper vs the runtime's transformers path vs dense bf16.

    .venv/bin/python benchmarks/whisper_decode.py [--runs 3] [--new-tokens 64] [--layers 12] [--output PATH]

A randomly initialised Whisper of whisper-small's shape (d_model 768, ffn 3072, 12 + 12 blocks, 12 heads, 80 mel
bins, vocab 51865), every block linear magnitude-pruned to --sparsity, written once as a bf16 bitmask archive,
then loaded three ways side by side in this process: `runtime.load(archive)` (the own Whisper, the default),
`runtime.load(decoder="transformers")` (transformers' Whisper with SparseLinear and the attention op, its layer
code unpatched), and the dense bf16 transformers model; the own Whisper runs twice, with its one-call decoding
step (the default) and with it off (`one_call_steps = False`: the same ops called from Python). Each transcribes
one 30 s window of random features greedily from the clip's encoder output, computed once per model (the encoder
is left out); decoder tokens/s is the extra time of --new-tokens tokens over one token, alternating the models run
by run, medians of --runs, a copy-bandwidth probe per run. Writes one JSON per run under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from sparseft import formats, runtime
from sparseft.hf import find_targets
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.runtime.bench import copy_bandwidth, cpu_name, result_path
from sparseft.runtime.models import WhisperModel

PYTHON_STEPS = "sparseft, python steps"


def whisper_small(layers: int) -> transformers.WhisperForConditionalGeneration:
    config = transformers.WhisperConfig(
        d_model=768, encoder_ffn_dim=3072, decoder_ffn_dim=3072, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=12, decoder_attention_heads=12, num_mel_bins=80, vocab_size=51865,
        begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration(config).to(torch.bfloat16).eval()


def encode(model: Any, features: torch.Tensor) -> Any:
    """The clip's encoder output, computed once: the timings leave the encoder out (its seconds would swamp a
    decoder figure taken as a difference)."""
    with torch.inference_mode():
        if isinstance(model, WhisperModel):
            return model.encode(features)
        return model.get_encoder()(features)


def transcribe_seconds(model: Any, features: torch.Tensor, encoded: Any, tokens: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        if isinstance(model, WhisperModel):
            model.generate(features, max_new_tokens=tokens, eos_token_id=[], encoded=encoded)
        else:  # a random model may end early: min_new_tokens fixes the work
            model.generate(
                features,
                encoder_outputs=encoded,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
            )
    return time.perf_counter() - started


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12, help="fewer for a quick smoke run")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--output", help="default: benchmarks/results/whisper_decode_DATE_CPU.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = whisper_small(args.layers)
    with torch.no_grad():
        for module in find_targets(dense).values():
            module.weight.copy_(magnitude_prune(module.weight, args.sparsity))
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        archive.mkdir()
        formats.write_bitmask(dense, find_targets(dense), archive)
        dense.generation_config.save_pretrained(archive)
        own = runtime.load(archive)
        if not isinstance(own, WhisperModel):
            raise SystemExit(f"runtime.load ran {own.decoder_name}, not the own Whisper")
        models = {
            "sparseft whisper": own,
            PYTHON_STEPS: own,
            "transformers path": runtime.load(archive, decoder="transformers"),
            "dense bf16": dense,
        }
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0)).bfloat16()
    encoded = {name: encode(model, features) for name, model in models.items()}
    for name, model in models.items():  # warm-up
        own.one_call_steps = name != PYTHON_STEPS
        transcribe_seconds(model, features, encoded[name], 2)
    decode: dict[str, list[float]] = {name: [] for name in models}
    bandwidth = []
    for _ in range(args.runs):
        bandwidth.append(copy_bandwidth(128, 3))
        for name, model in models.items():
            own.one_call_steps = name != PYTHON_STEPS
            one = transcribe_seconds(model, features, encoded[name], 1)
            full = transcribe_seconds(model, features, encoded[name], args.new_tokens)
            decode[name].append((args.new_tokens - 1) / max(full - one, 1e-9))
    tok_s = {name: round(statistics.median(values), 2) for name, values in decode.items()}
    print(f"{'variant':<24} {'decoder tok/s':>14} {'x transformers path':>20} {'x dense bf16':>13}")
    for name, value in tok_s.items():
        print(
            f"{name:<24} {value:>14.2f} {value / tok_s['transformers path']:>20.2f} {value / tok_s['dense bf16']:>13.2f}"
        )
    probe = statistics.median(bandwidth)
    print(
        f"{torch.get_num_threads()} threads, kernels {runtime.current_isa()}, copy bandwidth {probe:.1f} GB/s"
    )
    out = Path(args.output or result_path("whisper_decode"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "kernels": runtime.current_isa(),
            "copy_gb_s": round(probe, 1),
        },
        "layers": args.layers,
        "sparsity": args.sparsity,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "decoder_tok_s": tok_s,
        "x_transformers_path": round(tok_s["sparseft whisper"] / tok_s["transformers path"], 2),
        "x_python_steps": round(tok_s["sparseft whisper"] / tok_s[PYTHON_STEPS], 2),
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
