"""Encoder-decoder CPU inference: sparseft's SparseLinear vs transformers dense bf16, for T5 and Whisper.

    .venv/bin/python benchmarks/encdec_decode.py [--runs 3] [--sparsity 0.7] [--output PATH]
    .venv/bin/python benchmarks/encdec_decode.py --quick     # a smoke run: 1 block each, tiny workloads, no JSON

Randomly initialised models of T5-small's shape (d_model 512, d_ff 2048, 6 + 6 blocks, 8 heads, vocab 32128) and
Whisper-small's (d_model 768, ffn 3072, 12 + 12 blocks, 12 heads, 80 mel bins, vocab 51865) are pruned to
--sparsity by magnitude (speed does not depend on which weights survive) in bf16; the sparse copy runs every
pruned linear (encoder and decoder, self- and cross-attention, feed-forward) on `SparseLinear` with bf16 values.
Workloads, batch 1 as a latency-bound server would run them:
- T5: translation of --sentences sentences of 32 source tokens, beam search with 5 beams, --new-tokens new tokens
  each (a random model never stops early: min_new_tokens = max_new_tokens fixes the work);
- Whisper: transcription of one 30 s window of audio (80 x 3000 log-mel frames), greedy, --transcript-tokens tokens.
The measuring is `sparseft.runtime.bench.measure_seq2seq`, the same as `sparseft bench` on a T5 or Whisper export:
encoder latency, decoder tokens/s, the job's wall time and peak memory; sparse and dense alternate run by run,
medians of --runs, a copy-bandwidth probe per run. Ratios are sparse over dense (speed-ups: > 1 is faster).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from sparseft import runtime
from sparseft.hf import find_targets
from sparseft.io import write_json
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.runtime.bench import measure_seq2seq, result_path, seq2seq_inputs

SOURCE_TOKENS = 32
T5_BEAMS = 5


def t5_small(layers: int = 6) -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=layers, num_decoder_layers=layers,
        num_heads=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def whisper_small(layers: int = 12) -> transformers.WhisperForConditionalGeneration:
    config = transformers.WhisperConfig(
        vocab_size=51865, d_model=768, encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=12,
        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, pad_token_id=50257, eos_token_id=50257,
        bos_token_id=50257, decoder_start_token_id=50258, begin_suppress_tokens=None, suppress_tokens=None,
    )  # fmt: skip
    return transformers.WhisperForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def prune_and_sparsify(model: nn.Module, sparsity: float) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model`'s targets in place by magnitude and return a copy on SparseLinear, with its summary."""
    with torch.no_grad():
        for module in find_targets(model).values():
            module.weight.copy_(magnitude_prune(module.weight, sparsity))
    sparse = copy.deepcopy(model)
    summary = runtime.sparsify_(sparse, "bf16")
    return sparse, summary


def ratios(sparse: dict[str, Any], dense: dict[str, Any]) -> dict[str, float | None]:
    peaks = sparse["peak_bytes"], dense["peak_bytes"]
    return {
        "encoder_speedup": dense["encoder_ms"] / sparse["encoder_ms"],
        "decode_speedup": sparse["decode_tok_s"] / dense["decode_tok_s"],
        "job_speedup": dense["job_s"] / sparse["job_s"],
        "model_bytes": sparse["model_bytes"] / dense["model_bytes"],
        "peak_bytes": peaks[0] / peaks[1] if None not in peaks else None,
    }


def compare(
    dense: nn.Module, sparsity: float, new_tokens: int, num_beams: int, runs: int, sentences: int = 1
) -> dict[str, Any]:
    """Prune `dense`, time it against its sparse copy on random inputs of its kind (T5: `sentences` sentences;
    Whisper: one window), and give the ratios."""
    sparse, summary = prune_and_sparsify(dense, sparsity)
    inputs, workload = seq2seq_inputs(dense.config, sentences, SOURCE_TOKENS)
    result = measure_seq2seq({"sparse": sparse, "dense": dense}, inputs, new_tokens, num_beams, runs)
    machine = result.pop("_machine")
    return {
        **result,
        "ratios": ratios(result["sparse"], result["dense"]),
        "workload": {**workload, "new_tokens": new_tokens, "num_beams": num_beams},
        "copy_gb_s": machine["copy_gb_s"],
        "layers": summary["layers"],
    }


def print_table(results: dict[str, Any]) -> None:
    print(
        f"\nsparse ({results['sparsity']:.0%}) vs dense bf16, {results['threads']} threads, "
        f"kernels {results['kernels']}"
    )
    print(f"{'family':<8} {'encoder ms':>18} {'decode tok/s':>18} {'job s':>16} {'speed-up enc/dec/job':>22}")
    for family in ("t5", "whisper"):
        if family in results:
            r = results[family]
            s, d, x = r["sparse"], r["dense"], r["ratios"]
            print(
                f"{family:<8} {s['encoder_ms']:>8.1f} vs {d['encoder_ms']:>6.1f} {s['decode_tok_s']:>8.1f} vs "
                f"{d['decode_tok_s']:>6.1f} {s['job_s']:>7.2f} vs {d['job_s']:>5.2f} "
                f"{x['encoder_speedup']:>7.2f} {x['decode_speedup']:>6.2f} {x['job_speedup']:>6.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--sentences", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="T5: new tokens per sentence")
    parser.add_argument("--transcript-tokens", type=int, default=96, help="Whisper: tokens of the transcript")
    parser.add_argument("--only", choices=["t5", "whisper"], help="benchmark one family")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 1 block each, tiny workloads, no JSON"
    )
    parser.add_argument("--output", help="JSON results (default: benchmarks/results/, dated)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.sentences, args.new_tokens, args.transcript_tokens = 1, 2, 4, 4
    output = args.output or (None if args.quick else result_path("encdec_decode"))

    torch.manual_seed(0)
    results: dict[str, Any] = {
        "sparsity": args.sparsity,
        "threads": torch.get_num_threads(),
        "kernels": runtime.current_isa(),
        "dense": "transformers bf16",
        "sparse": "sparseft SparseLinear bf16",
    }
    if args.only in (None, "t5"):
        print(
            f"T5-small shape, {args.sparsity:.0%} sparse: {args.sentences} sentences, beam {T5_BEAMS}",
            flush=True,
        )
        t5 = t5_small(1 if args.quick else 6)
        results["t5"] = compare(t5, args.sparsity, args.new_tokens, T5_BEAMS, args.runs, args.sentences)
        del t5  # free it before Whisper is built
    if args.only in (None, "whisper"):
        print(f"Whisper-small shape, {args.sparsity:.0%} sparse: 30 s of audio, greedy", flush=True)
        whisper = whisper_small(1 if args.quick else 12)
        results["whisper"] = compare(whisper, args.sparsity, args.transcript_tokens, 1, args.runs)
    print_table(results)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        write_json(output, results)
        print(f"-> {output}")


if __name__ == "__main__":
    main()
