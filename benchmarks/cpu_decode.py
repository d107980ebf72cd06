"""End-to-end CPU decoding: sparseft's own decoder (bf16, int8 and int4 values) and its transformers path vs
transformers dense bf16 and fp32, and vs llama.cpp (BF16, Q8_0, Q4_0).

    .venv/bin/python benchmarks/cpu_decode.py [--new-tokens 128] [--prompt-tokens 32] [--runs 3]
        [--workdir /tmp/sparseft-decode] [--output benchmarks/results/cpu_decode_DATE_CPU.json]
        [--skip 'transformers fp32,llama.cpp BF16'] [--llamacpp-venv ~/.cache/sparseft-llamacpp/venv]

A randomly initialised Llama of TinyLlama's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV heads,
vocab 32000; about 1.1B parameters) is pruned to 70% by magnitude (speed does not depend on which weights survive)
and saved four ways in --workdir (reused by later runs): a dense bf16 HF checkpoint, a bitmask archive, an int8
bitmask archive and an int4 one (a scale per 128 columns, RTN); the int8 archive also runs with its LM head in int8
(`head_values="int8"`), and on the runtime's transformers path (`decoder="transformers"`: transformers' Llama code
with sparse linears swapped in), the int4 archive with its LM head in int8. Then:
- tokens/s of greedy decoding (`model.generate`, --new-tokens new tokens after a --prompt-tokens prompt) and of the
  prompt's prefill for the seven models (and llama.cpp's three, below), loaded side by side in this process and run
  alternately; medians of --runs, a copy-bandwidth probe per run;
- peak memory of each, each in a fresh process that loads the model from disk and generates (ru_maxrss, and the
  same minus the process's size before loading);
- the milliseconds per token spent outside the linears (attention, norms, rotary, sampling, Python): the sparse
  bf16 model timed again with every linear replaced by a stub.

llama.cpp baseline (benchmarks/llamacpp.py): llama-cpp-python built from source in its own venv, --llamacpp-venv
(see llamacpp.py for the build; where it is missing or broken, one line says llama.cpp was skipped and how to build
it, and the rest runs as before). The dense checkpoint is converted to GGUF BF16 and quantized by llama.cpp to Q8_0
and Q4_0 (its defaults: Q4_0's output head is Q6_K), kept in --workdir; the three run dense, as llama.cpp runs them,
in a worker process of that venv holding them side by side, with the torch models' thread count and a context of
max(512, prompt + new tokens). They take their turns in the same alternating passes as the other variants, timed
here the same way (a prompt and one token, then the prompt and --new-tokens greedy tokens, no early stop; the
worker's round trip, about 0.3 ms a call, is in the time), and their peak memory is measured in a fresh
process of that venv that loads and generates (its size before loading is after importing llama_cpp). Printed
and in the JSON ("vs_llamacpp"): sparseft int4 and int8 with int8 head vs llama.cpp Q4_0 (and int8 vs Q8_0), sparseft bf16 vs
llama.cpp BF16, as ratios of decode and prefill tokens/s, of peak RSS (whole processes: sparseft's carries torch
and transformers, about 0.5 GB before loading) and of model+act (peak minus the size before loading).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import llamacpp
import torch
import transformers
from torch import nn

from sparseft import formats, runtime
from sparseft.hf import find_targets
from sparseft.io import atomic_dir
from sparseft.pruning.magnitude import magnitude_prune
from sparseft.quant.spec import QuantSpec, rtn_quantize
from sparseft.runtime.bench import copy_bandwidth, cpu_name, measure_generation, result_path

VARIANTS = [
    "transformers fp32",
    "transformers bf16",
    "sparseft bf16",
    "sparseft int8",
    "sparseft int8, int8 head",
    "sparseft int4, int8 head",
    "transformers path int8",
    "llama.cpp BF16",
    "llama.cpp Q8_0",
    "llama.cpp Q4_0",
]
LLAMACPP = "llama.cpp "
# sparseft variant vs llama.cpp variant, printed and in the JSON.
LLAMACPP_PAIRS = [
    ("sparseft int4, int8 head", "llama.cpp Q4_0"),
    ("sparseft int8, int8 head", "llama.cpp Q4_0"),
    ("sparseft int8, int8 head", "llama.cpp Q8_0"),
    ("sparseft bf16", "llama.cpp BF16"),
]
PROMPT_TOKENS = 32


def tinyllama_config(layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


ARCHIVES = {"archive-bf16": None, "archive-int8": QuantSpec(8), "archive-int4": QuantSpec(4, 128)}


def prepare(workdir: Path, layers: int, sparsity: float) -> None:
    """Write the dense checkpoint and the archives once; later runs reuse them (and add an archive they lack)."""
    missing = [name for name in ARCHIVES if not (workdir / name).exists()]
    if (workdir / "dense").exists() and not missing:
        return
    print(
        f"building a {layers}-layer TinyLlama-shaped model pruned to {sparsity:.0%} in {workdir} (once)...",
        flush=True,
    )
    if (workdir / "dense").exists():
        model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "dense", dtype=torch.bfloat16)
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(tinyllama_config(layers), dtype=torch.bfloat16)
        with torch.no_grad():
            for module in find_targets(model).values():
                module.weight.copy_(magnitude_prune(module.weight, sparsity))
        workdir.mkdir(parents=True, exist_ok=True)
        with atomic_dir(workdir / "dense") as tmp:
            model.save_pretrained(tmp)
        missing = list(ARCHIVES)
    targets = find_targets(model.eval())
    for name in missing:
        spec = ARCHIVES[name]
        quantized = {n: rtn_quantize(m.weight.detach(), spec) for n, m in targets.items()} if spec else None
        with atomic_dir(workdir / name) as tmp:
            formats.write_bitmask(model, targets, tmp, quantized, spec.describe() if spec else None)


def load_variant(name: str, workdir: Path) -> nn.Module:
    if name == "transformers fp32":
        return transformers.AutoModelForCausalLM.from_pretrained(
            workdir / "dense", dtype=torch.float32
        ).eval()
    if name == "transformers bf16":
        return transformers.AutoModelForCausalLM.from_pretrained(
            workdir / "dense", dtype=torch.bfloat16
        ).eval()
    if name == "sparseft bf16":
        return runtime.load(workdir / "archive-bf16")
    if name == "sparseft int8":
        return runtime.load(workdir / "archive-int8")
    if name == "transformers path int8":
        return runtime.load(workdir / "archive-int8", decoder="transformers")
    if name == "sparseft int4, int8 head":
        return runtime.load(workdir / "archive-int4", head_values="int8")
    return runtime.load(workdir / "archive-int8", head_values="int8")


class LlamaCppModel(nn.Module):
    """A GGUF model in the llama.cpp worker, with what `measure_generation` asks of a model: `config.vocab_size`
    and `generate` (greedy, exactly `max_new_tokens` tokens). It holds no tensors here, so its model_bytes reads 0
    and main puts the GGUF file's size in its row instead."""

    decoder_name = "llama.cpp"

    def __init__(self, worker: llamacpp.Worker, name: str, config: transformers.PretrainedConfig) -> None:
        super().__init__()
        self.worker, self.name, self.config = worker, name, config

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **_: Any) -> torch.Tensor:
        new = self.worker.generate(self.name, input_ids[0].tolist(), max_new_tokens)
        return torch.cat([input_ids, torch.tensor([new])], dim=1)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: that survives fork + exec, so a child would
    report the parent's peak when the parent was larger."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def memory_prompt() -> list[int]:
    return torch.randint(0, 32000, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(0)).tolist()


def memory_child(name: str, workdir: Path) -> None:
    """Run in a fresh process: load one model, generate, print the peak memory as JSON."""
    # Import transformers' Llama and generation code first (a tiny model does it): those ~250 MB of code and
    # tables are the same for every variant and are not the model's memory.
    tiny = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
    )
    tiny.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens=2, do_sample=False, pad_token_id=0)
    del tiny
    before = rss_bytes()
    model = load_variant(name, workdir)
    ids = torch.tensor([memory_prompt()])
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)  # type: ignore[operator]
    peak = peak_rss_bytes()
    print(json.dumps({"peak_rss": peak, "before_load": before, "peak_minus_before": peak - before}))


def peak_memory(name: str, workdir: Path) -> dict[str, int]:
    cmd = [sys.executable, __file__, "--child", name, "--child-dir", str(workdir)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def prepare_llamacpp(variants: list[str], workdir: Path, venv: Path, threads: int) -> dict[str, Path]:
    """The GGUF file of each llama.cpp variant asked for, made once in workdir; none, with a line saying so, where
    the llama.cpp venv is missing or broken."""
    quants = [v.removeprefix(LLAMACPP) for v in variants if v.startswith(LLAMACPP)]
    if not quants:
        return {}
    files = llamacpp.prepare(workdir / "dense", workdir / "gguf", quants, venv, threads)
    if files is None:
        print(f"llama.cpp skipped: {llamacpp.build_hint(venv)}")
        return {}
    return {LLAMACPP + quant: path for quant, path in files.items()}


def _stub(out_features: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A linear's forward that returns zeros of the right shape at almost no cost."""
    return lambda x: x.new_zeros(*x.shape[:-1], out_features)


def outside_linears(
    model: nn.Module, prompt_tokens: int, new_tokens: int, runs: int, one_call: bool = True
) -> float:
    """Decode ms/token with every linear stubbed out: the cost of everything else. The stub replaces each linear's
    forward in place, not the module, since the own decoder holds the modules themselves; its one-call decoding
    step (runtime/models/step.py) stubs them itself when asked (`stub_linears`)."""
    linears = [
        m for m in model.modules() if isinstance(m, (nn.Linear, runtime.SparseLinear, runtime.DenseLinear))
    ]
    for m in linears:
        m.forward = _stub(m.out_features)  # type: ignore[method-assign]
    model.stub_linears, model.one_call_steps = True, one_call
    try:
        result = measure_generation({"stubbed": model}, prompt_tokens, new_tokens, runs)
    finally:
        for m in linears:
            del m.forward
        model.stub_linears, model.one_call_steps = False, True
    return 1000 / result["stubbed"]["decode_tok_s"]


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparseft-decode")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=PROMPT_TOKENS,
        help="prompt length for the speed runs and the memory runs",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--layers", type=int, default=22, help="fewer layers for a quick smoke run")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument(
        "--skip", default="", help="comma-separated variants to leave out, e.g. 'transformers fp32'"
    )
    parser.add_argument("--output", help="default: benchmarks/results/cpu_decode_DATE_CPU.json")
    parser.add_argument(
        "--llamacpp-venv",
        type=Path,
        default=llamacpp.DEFAULT_VENV,
        help="venv with llama-cpp-python built from source (see benchmarks/llamacpp.py); skipped where missing",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_child(args.child, Path(args.child_dir))
        return
    workdir = Path(args.workdir) / f"layers{args.layers}-s{args.sparsity}"
    prepare(workdir, args.layers, args.sparsity)
    variants = [v for v in VARIANTS if v not in args.skip.split(",")]
    threads = torch.get_num_threads()
    n_ctx = max(512, args.prompt_tokens + args.new_tokens)
    gguf = prepare_llamacpp(variants, workdir, args.llamacpp_venv, threads)
    variants = [v for v in variants if not v.startswith(LLAMACPP) or v in gguf]
    print(f"kernels {runtime.current_isa()}, {threads} threads; peak memory, one fresh process each...")
    memory = {
        name: llamacpp.peak_memory(gguf[name], memory_prompt(), 8, threads, n_ctx, args.llamacpp_venv)
        if name in gguf
        else peak_memory(name, workdir)
        for name in variants
    }

    print(f"decoding {args.new_tokens} tokens, {args.runs} alternating runs...", flush=True)
    worker = llamacpp.Worker(gguf, threads, n_ctx, args.llamacpp_venv) if gguf else None
    config = transformers.AutoConfig.from_pretrained(workdir / "dense")
    models = {
        name: LlamaCppModel(worker, name, config) if worker and name in gguf else load_variant(name, workdir)
        for name in variants
    }
    started = time.perf_counter()
    try:
        speed = measure_generation(models, args.prompt_tokens, args.new_tokens, args.runs)
    finally:
        if worker:
            worker.close()
    machine = speed.pop("_machine")
    for name, path in gguf.items():
        speed[name]["model_bytes"] = path.stat().st_size
    other_ms = other_python_ms = None
    if "sparseft bf16" in models:
        stubbed = (models["sparseft bf16"], args.prompt_tokens, min(args.new_tokens, 32), args.runs)
        other_ms = outside_linears(*stubbed)
        other_python_ms = outside_linears(*stubbed, one_call=False)
    bandwidth = statistics.median([machine["copy_gb_s"], copy_bandwidth()])

    reference = speed.get("transformers bf16", {}).get("decode_tok_s")
    prefill_reference = speed.get("transformers bf16", {}).get("prefill_tok_s")
    dense_peak = memory.get("transformers bf16", {}).get("peak_minus_before")
    rows: dict[str, Any] = {}
    print(
        f"\n{'variant':<25} {'decode tok/s':>12} {'x dense bf16':>13} {'ms/token':>9} "
        f"{'prefill tok/s':>14} {'x dense bf16':>13} {'peak RSS MB':>12} {'model+act MB':>13} {'x dense bf16':>13}"
    )
    for name in variants:
        tok_s = speed[name]["decode_tok_s"]
        mem = memory[name]
        rows[name] = {
            **speed[name],
            **mem,
            "x_dense_bf16_speed": round(tok_s / reference, 2) if reference else None,
            "x_dense_bf16_prefill": round(speed[name]["prefill_tok_s"] / prefill_reference, 2)
            if prefill_reference
            else None,
            "x_dense_bf16_memory": round(mem["peak_minus_before"] / dense_peak, 3) if dense_peak else None,
        }
        print(
            f"{name:<25} {tok_s:>12.2f} {rows[name]['x_dense_bf16_speed'] or 0:>13.2f} {1000 / tok_s:>9.1f} "
            f"{speed[name]['prefill_tok_s']:>14.1f} {rows[name]['x_dense_bf16_prefill'] or 0:>13.2f} "
            f"{mem['peak_rss'] / 1e6:>12.0f} {mem['peak_minus_before'] / 1e6:>13.0f} {rows[name]['x_dense_bf16_memory'] or 0:>13.3f}"
        )
    if "transformers path int8" in speed and "sparseft int8" in speed:
        own, path = speed["sparseft int8"]["decode_tok_s"], speed["transformers path int8"]["decode_tok_s"]
        print(f"\nown decoder vs transformers path, int8: {own / path:.2f}x decode tok/s")
    vs_llamacpp: dict[str, dict[str, float]] = {}
    for ours, theirs in LLAMACPP_PAIRS:
        if ours in rows and theirs in rows:
            vs_llamacpp[f"{ours} / {theirs}"] = {
                "decode": round(rows[ours]["decode_tok_s"] / rows[theirs]["decode_tok_s"], 2),
                "prefill": round(rows[ours]["prefill_tok_s"] / rows[theirs]["prefill_tok_s"], 2),
                "peak_rss": round(rows[ours]["peak_rss"] / rows[theirs]["peak_rss"], 3),
                "model_act": round(rows[ours]["peak_minus_before"] / rows[theirs]["peak_minus_before"], 3),
            }
    if vs_llamacpp:
        print(
            f"\n{'sparseft / llama.cpp':<42} {'decode':>7} {'prefill':>8} {'peak RSS':>9} {'model+act':>10}"
        )
        for pair, r in vs_llamacpp.items():
            print(
                f"{pair:<42} {r['decode']:>7.2f} {r['prefill']:>8.2f} {r['peak_rss']:>9.3f} {r['model_act']:>10.3f}"
            )
    if other_ms is not None:
        total_ms = 1000 / speed["sparseft bf16"]["decode_tok_s"]
        print(
            f"\nsparseft bf16: {total_ms:.1f} ms/token, of which {other_ms:.1f} ms outside the linears ({other_ms / total_ms:.0%}); "
            f"{other_python_ms:.1f} ms with the layers' steps in Python rather than one C++ call"
        )
    print(
        f"copy bandwidth {bandwidth:.1f} GB/s (median of the probes), clock {machine.get('clock_ghz') or 'n/a'} GHz; "
        "targets: bf16 >= 2.5x, int8 >= 3.5x dense bf16 tokens/s; peak memory <= 0.45x dense bf16; outside the "
        "linears <= 2 ms/token; int4 + int8 head >= 1.5x llama.cpp Q4_0 decode, peak memory <= Q4_0's"
    )
    out = Path(args.output or result_path("cpu_decode"))
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            **machine,
            "cpu": cpu_name(),
            "copy_gb_s": round(bandwidth, 1),
            "kernels": runtime.current_isa(),
        },
        "decoders": {name: getattr(m, "decoder_name", "transformers") for name, m in models.items()},
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "runs": args.runs,
        "layers": args.layers,
        "sparsity": args.sparsity,
        "variants": rows,
        "outside_linears_ms_per_token": other_ms,
        "outside_linears_ms_per_token_python_blocks": other_python_ms,
        "llamacpp": {
            **worker.info,
            "venv": str(args.llamacpp_venv),
            "n_ctx": n_ctx,
            "gguf": {name: str(path) for name, path in gguf.items()},
        }
        if worker
        else None,
        "vs_llamacpp": vs_llamacpp,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(report, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
