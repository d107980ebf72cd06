"""Encoder-decoder CPU inference: sparseft's SparseLinear vs transformers dense bf16, for T5 and Whisper.

    .venv/bin/python benchmarks/encdec_decode.py [--runs 3] [--sparsity 0.7] [--output PATH]

Randomly initialised models of T5-small's shape (d_model 512, d_ff 2048, 6 + 6 blocks, 8 heads, vocab 32128) and
Whisper-small's (d_model 768, ffn 3072, 12 + 12 blocks, 12 heads, 80 mel bins, vocab 51865) are pruned to
--sparsity by magnitude (speed does not depend on which weights survive) in bf16; the sparse copy runs every
pruned linear (encoder and decoder, self- and cross-attention, feed-forward) on `SparseLinear` with bf16 values.
Workloads, batch 1 as a latency-bound server would run them:
- T5: translation of --sentences sentences of 32 source tokens, beam search with 5 beams, --new-tokens new tokens
  each (a random model never stops early: min_new_tokens = max_new_tokens fixes the work);
- Whisper: transcription of one 30 s window of audio (80 x 3000 log-mel frames), greedy, --transcript-tokens tokens.
Reported per model: encoder latency (the encoder alone), decoder tokens/s ((generate time - encoder time) / new
tokens) and the whole job's wall time; sparse and dense alternate run by run, medians of --runs, with a
copy-bandwidth probe per run. Ratios are sparse over dense (speed-ups: > 1 is faster).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from sparseft import runtime
from sparseft.atomic import write_json
from sparseft.models import find_targets
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.runtime.bench import copy_bandwidth, model_bytes

SOURCE_TOKENS = 32


def t5_small() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration._from_config(config, dtype=torch.bfloat16).eval()


def whisper_small() -> transformers.WhisperForConditionalGeneration:
    config = transformers.WhisperConfig(
        vocab_size=51865, d_model=768, encoder_layers=12, decoder_layers=12, encoder_attention_heads=12,
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


@torch.inference_mode()
def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def t5_job(model: nn.Module, sources: list[torch.Tensor], new_tokens: int) -> dict[str, float]:
    encoder = model.get_encoder()  # type: ignore[operator]
    encode = sum(timed(lambda s=s: encoder(input_ids=s)) for s in sources)
    total = sum(
        timed(
            lambda s=s: model.generate(  # type: ignore[operator]
                input_ids=s,
                num_beams=5,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
            )
        )
        for s in sources
    )
    return {
        "encoder_ms": 1000 * encode / len(sources),
        "decode_tok_s": len(sources) * new_tokens / max(total - encode, 1e-9),
        "job_s": total,
    }


def whisper_job(model: nn.Module, features: torch.Tensor, new_tokens: int) -> dict[str, float]:
    encoder = model.get_encoder()  # type: ignore[operator]
    encode = timed(lambda: encoder(input_features=features))
    total = timed(
        lambda: model.generate(  # type: ignore[operator]
            input_features=features, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    )
    return {
        "encoder_ms": 1000 * encode,
        "decode_tok_s": new_tokens / max(total - encode, 1e-9),
        "job_s": total,
    }


def compare(name: str, dense: nn.Module, sparse: nn.Module, job: Any, runs: int) -> dict[str, Any]:
    """Run `job` on both models alternately `runs` times (after a warm-up); medians and sparse/dense ratios."""
    models = {"sparse": sparse, "dense": dense}
    for model in models.values():
        job(model, warmup=True)
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    bandwidth = []
    for run in range(runs):
        bandwidth.append(copy_bandwidth(128, 3))
        order = list(models) if run % 2 == 0 else list(reversed(models))  # alternate who goes first
        for key in order:
            rows[key].append(job(models[key], warmup=False))
            print(
                f"  {name} run {run + 1}/{runs} {key}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in rows[key][-1].items()),
                flush=True,
            )
    medians = {k: {m: statistics.median(r[m] for r in rows[k]) for m in rows[k][0]} for k in models}
    return {
        **medians,
        "ratios": {
            "encoder_speedup": medians["dense"]["encoder_ms"] / medians["sparse"]["encoder_ms"],
            "decode_speedup": medians["sparse"]["decode_tok_s"] / medians["dense"]["decode_tok_s"],
            "job_speedup": medians["dense"]["job_s"] / medians["sparse"]["job_s"],
        },
        "model_mb": {k: model_bytes(m) / 1e6 for k, m in models.items()},
        "copy_gb_s": statistics.median(bandwidth),
    }


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
    parser.add_argument("--output", default="benchmarks/results/encdec_decode.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {
        "sparsity": args.sparsity,
        "threads": torch.get_num_threads(),
        "kernels": runtime.current_isa(),
        "dense": "transformers bf16",
        "sparse": "sparseft SparseLinear bf16",
    }
    if args.only in (None, "t5"):
        print(f"T5-small shape, {args.sparsity:.0%} sparse: {args.sentences} sentences, beam 5", flush=True)
        dense = t5_small()
        sparse, summary = prune_and_sparsify(dense, args.sparsity)
        sources = [torch.randint(2, 32128, (1, SOURCE_TOKENS), generator=gen) for _ in range(args.sentences)]

        def t5(model: nn.Module, warmup: bool) -> dict[str, float]:
            return t5_job(model, sources[:1] if warmup else sources, 4 if warmup else args.new_tokens)

        results["t5"] = {**compare("t5", dense, sparse, t5, args.runs), "layers": summary["layers"]}
        del dense, sparse
    if args.only in (None, "whisper"):
        print(f"Whisper-small shape, {args.sparsity:.0%} sparse: 30 s of audio, greedy", flush=True)
        dense = whisper_small()
        sparse, summary = prune_and_sparsify(dense, args.sparsity)
        features = torch.randn(1, 80, 3000, generator=gen).to(torch.bfloat16)

        def whisper(model: nn.Module, warmup: bool) -> dict[str, float]:
            return whisper_job(model, features, 4 if warmup else args.transcript_tokens)

        results["whisper"] = {
            **compare("whisper", dense, sparse, whisper, args.runs),
            "layers": summary["layers"],
        }

    print(
        f"\nsparse ({args.sparsity:.0%}) vs dense bf16, {results['threads']} threads, kernels {results['kernels']}"
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
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output, results)
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
