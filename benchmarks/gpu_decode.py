"""GPU sparse decode: correctness, kernel timings against cuBLAS, and a CUDA-graph decode step. One command:

    python benchmarks/gpu_decode.py                 # on a CUDA machine with `pip install -e .[gpu]`
    python benchmarks/gpu_decode.py --quick         # a smoke run (fewer shapes, no config sweep)

It writes gpu_decode.json to --out (default: $OUT, else ./out), section by section, so a run cut short keeps
what it measured. Sections:

1. copy: device-to-device copy bandwidth (read + write bytes / time), the yardstick for "effective GB/s".
2. correctness: bf16, int8 and fp8 values (fp8 on compute capability 8.9+), every batch 1..16 and one prefill
   batch, against the float32 reference of `triton_pack.reference_linear`.
3. kernels: W of 4096x4096, 4096x12288, 12288x4096 (MPT-7B's fused QKV, out x in) and 11008x4096 at 50/70/80%
   sparsity, batch 1/4/16; torch dense bf16 (cuBLAS) vs sparse bf16/int8/fp8 values. Each timing replays a
   CUDA graph of calls that cycle through enough copies of the weight to overflow L2, as a model's layers do.
4. sweep: launch configurations (rows per program, warps, column split) at 70%, the best against the default
   (`LaunchConfig`; the default comes from `default_config`, which is where a better one should go).
5. model: a LLaMA-7B-shaped model (2 layers) pruned to 70%, SparseLinear on the GPU: greedy `generate()`
   against the dense model, then the decode step (one token, static KV cache) captured in a CUDA graph, ms per
   token sparse vs dense. This is the recipe of docs/GPU.md.

Without a GPU it runs the same code on tiny shapes in Triton's interpreter (a check of the script, no figures).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from sparseft.runtime.triton_kernels import LaunchConfig, default_config, triton_sparse_linear  # noqa: E402
from sparseft.runtime.triton_pack import TritonPacked, pack_dense, reference_linear  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
ACT = torch.bfloat16 if CUDA else torch.float32  # the interpreter's bf16 arithmetic is unreliable
L2_OVERFLOW_BYTES = 256 * 2**20  # H100/H200 L2 is 50 MB
VALUE_KINDS = ["bf16", "int8", "fp8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--quick", action="store_true", help="fewer shapes and no config sweep")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device_info()}
    kinds = [k for k in VALUE_KINDS if k != "fp8" or fp8_supported()] if CUDA else ["fp32", "int8", "fp8"]

    if CUDA:
        shapes = [(4096, 4096), (4096, 12288), (12288, 4096), (11008, 4096)]
        sparsities, batches = [0.5, 0.7, 0.8], [1, 4, 16]
    else:
        shapes, sparsities, batches = [(80, 300)], [0.7], [1, 16]
    if args.quick:
        shapes, sparsities = shapes[:1], [0.7]

    sections: list[tuple[str, Callable[[], Any]]] = [
        ("copy", copy_bandwidth),
        ("correctness", lambda: correctness(kinds)),
        ("kernels", lambda: kernel_table(shapes, sparsities, batches, kinds, report)),
        ("sweep", lambda: None if args.quick else sweep(shapes, batches, kinds)),
        ("model", model_decode),
    ]
    for name, run in sections:
        start = time.perf_counter()
        try:
            report[name] = run()
        except Exception as e:  # keep the other sections' figures
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[{name}] {time.perf_counter() - start:.1f} s", flush=True)
        (out / "gpu_decode.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'gpu_decode.json'}")


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": DEVICE}
    import triton

    info["triton"] = triton.__version__
    if CUDA:
        props = torch.cuda.get_device_properties(0)
        info.update(name=props.name, sms=props.multi_processor_count, capability=list(props_capability()))
    return info


def props_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if CUDA else (0, 0)


def fp8_supported() -> bool:
    return props_capability() >= (8, 9)


# ---------------------------------------------------------------------------------------------- timing


def time_us(calls: list[Callable[[], Any]], reps: int = 30) -> float:
    """Median microseconds per call. On the GPU the calls are captured once in a CUDA graph (no launch
    overhead, as in a graph-captured decode step) and the graph is replayed `reps` times."""
    if not CUDA:
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (and compile) outside the capture
        for call in calls[:2]:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)


def copies_for(nbytes: int) -> int:
    """How many copies of a weight make the timed loop read more than L2 holds."""
    return max(2, min(64, -(-L2_OVERFLOW_BYTES // max(nbytes, 1)))) if CUDA else 1


def clone_packed(p: TritonPacked) -> TritonPacked:
    scale = None if p.scale is None else p.scale.clone()
    return TritonPacked(p.shape, p.masks.clone(), p.tile_offsets.clone(), p.values.clone(), scale)


def copy_bandwidth() -> dict[str, float]:
    n = (1 << 30) if CUDA else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = time_us([lambda: dst.copy_(src)] * 4, reps=10)
    return {"bytes": n, "us": us, "GBps": 2 * n / us / 1e3}


# ---------------------------------------------------------------------------------------------- checks


def sparse_weight(rows: int, cols: int, sparsity: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(rows, cols, device=DEVICE, generator=gen)
    w[torch.rand(rows, cols, device=DEVICE, generator=gen) < sparsity] = 0
    return w


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).abs().max() / ref.abs().max())


def correctness(kinds: list[str]) -> dict[str, Any]:
    """Every value type and batch size against the float32 reference; bf16 outputs allow 2e-2."""
    rows, cols = (300, 1000) if CUDA else (37, 150)
    w = sparse_weight(rows, cols, 0.7)
    w[1] = 0  # an empty row
    results: dict[str, Any] = {}
    worst = 0.0
    for kind in kinds:
        packed = pack_dense(w, values=kind)
        errors = {}
        for batch in [*range(1, 17), 40]:  # 40 rows of x: the dense (prefill) path
            if not CUDA and batch not in (1, 3, 8, 16, 40):
                continue
            x = torch.randn(batch, cols, device=DEVICE, dtype=ACT)
            errors[batch] = rel_error(triton_sparse_linear(x, packed), reference_linear(x, packed))
        results[kind] = errors
        worst = max(worst, *errors.values())
    results["worst"] = worst
    results["ok"] = worst < (2e-2 if CUDA else 1e-5)
    print(f"correctness: worst relative error {worst:.2e} -> {'OK' if results['ok'] else 'FAILED'}")
    return results


# ---------------------------------------------------------------------------------------------- kernels


def bench_pair(
    w: torch.Tensor, kind: str, batch: int, config: LaunchConfig | None = None
) -> tuple[float, int, TritonPacked]:
    packed = pack_dense(w, values=kind)
    copies = [packed] + [clone_packed(packed) for _ in range(copies_for(packed.nbytes) - 1)]
    x = torch.randn(batch, w.shape[1], device=DEVICE, dtype=ACT)
    us = time_us([lambda p=p: triton_sparse_linear(x, p, config=config) for p in copies])
    return us, packed.nbytes, packed


def kernel_table(
    shapes: list[tuple[int, int]],
    sparsities: list[float],
    batches: list[int],
    kinds: list[str],
    report: dict[str, Any],
) -> list[dict[str, Any]]:
    copy_gbps = report.get("copy", {}).get("GBps", float("nan"))
    rows_out = []
    print(
        f"{'shape':>12} {'sp':>4} {'B':>3} {'dense us':>9} "
        + " ".join(f"{k + ' us':>9} {'x':>5}" for k in kinds)
    )
    for rows, cols in shapes:
        for sparsity in sparsities:
            w = sparse_weight(rows, cols, sparsity)
            dense = w.to(ACT)
            dense_copies = [dense] + [dense.clone() for _ in range(copies_for(dense.numel() * 2) - 1)]
            for batch in batches:
                x = torch.randn(batch, cols, device=DEVICE, dtype=ACT)
                dense_us = time_us([lambda d=d, x=x: F.linear(x, d) for d in dense_copies])
                dense_bytes = dense.numel() * dense.element_size()
                row: dict[str, Any] = {
                    "shape": [rows, cols],
                    "sparsity": sparsity,
                    "batch": batch,
                    "dense_us": dense_us,
                    "dense_GBps": dense_bytes / dense_us / 1e3,
                    "copy_GBps": copy_gbps,
                }
                for kind in kinds:
                    us, nbytes, _ = bench_pair(w, kind, batch)
                    row[kind] = {
                        "us": us,
                        "speedup_vs_dense": dense_us / us,
                        "bytes_per_weight": nbytes / w.numel(),
                        "ideal_speedup": dense_bytes / nbytes,
                        "GBps": nbytes / us / 1e3,
                        "of_copy_bw": nbytes / us / 1e3 / copy_gbps,
                    }
                rows_out.append(row)
                cells = " ".join(f"{row[k]['us']:9.1f} {row[k]['speedup_vs_dense']:5.2f}" for k in kinds)
                print(f"{rows}x{cols:<6} {sparsity:4.1f} {batch:3d} {dense_us:9.1f} {cells}", flush=True)
            del dense_copies
    return rows_out


SWEEP = [
    LaunchConfig(row_tiles=rt, num_warps=nw, split=0)
    for rt, nw in [(1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4), (8, 4)]
]


def sweep(shapes: list[tuple[int, int]], batches: list[int], kinds: list[str]) -> list[dict[str, Any]]:
    """At 70%: each launch configuration (and column splits around the default) against the default, on the
    first and last shape, the smallest and largest batch, bf16 and int8 values (a few minutes on an H200)."""
    results = []
    for rows, cols in sorted({shapes[0], shapes[-1]}):
        w = sparse_weight(rows, cols, 0.7)
        for batch in sorted({batches[0], batches[-1]}):
            for kind in kinds[:2]:
                base_us, _, packed = bench_pair(w, kind, batch)
                default = default_config(packed, batch)
                tried = {}
                for config in SWEEP:
                    config = LaunchConfig(config.row_tiles, 0, config.num_warps, default.dot_min_batch)
                    tried[f"rt{config.row_tiles}_w{config.num_warps}"] = bench_pair(w, kind, batch, config)[0]
                for split in (1, 2, 4, 8, 16):
                    config = LaunchConfig(default.row_tiles, split, default.num_warps, default.dot_min_batch)
                    tried[f"split{split}"] = bench_pair(w, kind, batch, config)[0]
                best = min(tried, key=tried.__getitem__)
                results.append(
                    {
                        "shape": [rows, cols],
                        "batch": batch,
                        "values": kind,
                        "default_us": base_us,
                        "best": best,
                        "best_us": tried[best],
                        "tried_us": tried,
                    }
                )
                print(
                    f"sweep {rows}x{cols} B={batch} {kind}: default {base_us:.1f} us, best {best} "
                    f"{tried[best]:.1f} us",
                    flush=True,
                )
    return results


# ---------------------------------------------------------------------------------------------- model


def model_decode() -> dict[str, Any]:
    """SparseLinear inside a transformers model: generate() agrees with dense; graph-captured decode step."""
    import transformers

    from sparseft.pruning.magnitude import magnitude_prune
    from sparseft.runtime import sparsify_

    if CUDA:
        dims = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
        layers, vocab = 2, 32000
    else:
        dims = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        layers, vocab = 2, 100
    config = transformers.LlamaConfig(
        **dims, num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=512
    )
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for block in dense.model.layers:
            for module in block.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(magnitude_prune(module.weight.float(), 0.7).to(module.weight.dtype))
    sparse = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    sparse.load_state_dict(dense.state_dict())
    sparsify_(sparse, values="bf16", fast_head=False)
    dense, sparse = dense.to(DEVICE, ACT), sparse.to(DEVICE, ACT)

    prompt = torch.randint(0, vocab, (1, 24), device=DEVICE)
    new = 32 if CUDA else 4
    with torch.no_grad():
        out_dense = dense.generate(prompt, max_new_tokens=new, do_sample=False)
        out_sparse = sparse.generate(prompt, max_new_tokens=new, do_sample=False)
        logits_dense = dense(prompt).logits[0, -1].float()
        logits_sparse = sparse(prompt).logits[0, -1].float()
    result: dict[str, Any] = {
        "layers": layers,
        "dims": dims,
        "generate_same_tokens": int((out_dense == out_sparse).sum()) - prompt.numel(),
        "generate_new_tokens": new,
        "last_logits_rel_error": rel_error(logits_sparse, logits_dense),
    }
    print(
        f"generate: {result['generate_same_tokens']}/{new} greedy tokens equal, "
        f"logits rel. error {result['last_logits_rel_error']:.2e}"
    )
    if CUDA:
        result["dense_ms_per_token"] = decode_step_ms(dense, prompt, config)
        result["sparse_ms_per_token"] = decode_step_ms(sparse, prompt, config)
        result["speedup"] = result["dense_ms_per_token"] / result["sparse_ms_per_token"]
        print(
            f"decode step (CUDA graph): dense {result['dense_ms_per_token']:.3f} ms, sparse "
            f"{result['sparse_ms_per_token']:.3f} ms per token -> {result['speedup']:.2f}x"
        )
    return result


def decode_step_ms(model: torch.nn.Module, prompt: torch.Tensor, config: Any, tokens: int = 64) -> float:
    """One-token decode steps with a static KV cache, captured in a CUDA graph (docs/GPU.md)."""
    from transformers import StaticCache

    cache = StaticCache(config=config, max_cache_len=prompt.shape[1] + tokens + 8)
    token = torch.zeros(1, 1, dtype=torch.long, device=DEVICE)
    position = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        model(prompt, past_key_values=cache, cache_position=torch.arange(prompt.shape[1], device=DEVICE))
        position.fill_(prompt.shape[1])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels and repacks SparseLinear weights
            for _ in range(2):
                model(token, past_key_values=cache, cache_position=position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = model(token, past_key_values=cache, cache_position=position).logits
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for step in range(tokens):
            position.fill_(prompt.shape[1] + step)
            graph.replay()
            token.copy_(logits[:, -1:].argmax(-1))
        end.record()
        end.synchronize()
    return start.elapsed_time(end) / tokens


if __name__ == "__main__":
    main()
