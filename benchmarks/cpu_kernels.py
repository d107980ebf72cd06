"""Kernel benchmark: y = W x for sparse W (bitmask + bf16 / int8 / int4 values) vs dense bf16 and fp32, on this CPU.

    .venv/bin/python benchmarks/cpu_kernels.py [--quick | --switch-only] [--reps 5] [--output ...json]

For each shape (4096x4096, 11008x4096, 4096x11008), sparsity (50/70/80/90%) and batch (1/4/16) it times, side by
side and alternating run by run: torch dense fp32, torch dense bf16, our dense bf16 GEMV (the strongest dense
baseline we could write), and the sparse kernels (bf16, int8, and int4 values with groups of 128 and 32 columns). Each variant cycles through enough copies
of its weight to read well past the last-level cache, so the figures are memory figures, not cache figures. A
STREAM-like copy probe, a clock probe (the core's GHz) and a compute probe (the bf16 kernel on a weight held in
L2: core cycles per 32 columns, which rise when the core is shared and move every figure bound by computation) run
before and after each batch; effective GB/s (weight bytes read per second) is reported with its fraction of that
bandwidth. Medians of `--reps`. A last section finds the batch size where decompress + dense matmul overtakes the
sparse kernels (expand, or AMX where present; for int8 past 32 tokens also AMX with 16-bit activations): the
runtime's prefill switch. `--switch-only` runs just that section.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sparseft.runtime import dispatch
from sparseft.runtime.bench import copy_bandwidth, median_known, result_path
from sparseft.runtime.packing import Packed, pack_dense

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9]
BATCHES = [1, 4, 16]
WORKING_SET = 400 * 2**20  # bytes each variant cycles through: more than this machine's 300 MiB L3


def copies_of(nbytes: int) -> int:
    return max(1, -(-WORKING_SET // max(nbytes, 1)))


def clone_packed(p: Packed) -> Packed:
    def c(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.clone()

    return Packed(
        p.shape,
        p.mask.clone(),
        p.values.clone(),
        p.row_start.clone(),
        c(p.scale),
        c(p.rowsum),
        checked=True,
        group_size=p.group_size,
    )


class Variant:
    """One way to compute y = W x: `run(i)` uses copy i of the weight; `nbytes` is one copy's size."""

    def __init__(self, name: str, nbytes: int, count: int, run: Callable[[int], object]) -> None:
        self.name, self.nbytes, self.count, self.run = name, nbytes, count, run
        self.times: list[float] = []

    def measure(self) -> None:
        start = time.perf_counter()
        for i in range(self.count):
            self.run(i)
        self.times.append((time.perf_counter() - start) / self.count)

    def median(self) -> float:
        return statistics.median(self.times)


def dense_variants(fp32: list[torch.Tensor], bf16: list[torch.Tensor], batch: int, isa: str) -> list[Variant]:
    rows, cols = fp32[0].shape
    x32 = torch.randn(batch, cols)
    x16 = x32.bfloat16()
    out = [
        Variant("torch fp32", rows * cols * 4, len(fp32), lambda i: torch.nn.functional.linear(x32, fp32[i])),
        Variant("torch bf16", rows * cols * 2, len(bf16), lambda i: torch.nn.functional.linear(x16, bf16[i])),
    ]
    if isa == "avx512":
        out.append(
            Variant("ours dense bf16", rows * cols * 2, len(bf16), lambda i: dispatch.dense_mm(x16, bf16[i]))
        )
    return out


# name: (values, int4 group size)
KINDS = {"bf16": ("bf16", None), "int8": ("int8", None), "int4 g128": ("int4", 128), "int4 g32": ("int4", 32)}


def packed_copies(weight: torch.Tensor) -> dict[str, list[Packed]]:
    """Enough copies of the packed weight (each kind of values) to read past the cache."""
    out = {}
    for name, (kind, group_size) in KINDS.items():
        first = pack_dense(weight, kind, group_size=group_size)  # type: ignore[arg-type]
        out[name] = [first] + [clone_packed(first) for _ in range(copies_of(first.nbytes()) - 1)]
    return out


def sparse_variants(packs: dict[str, list[Packed]], batch: int, isa: str) -> list[Variant]:
    x16 = torch.randn(batch, packs["bf16"][0].shape[1]).bfloat16()
    out = []
    for kind, copies in packs.items():
        run = (lambda ps: lambda i: dispatch.sparse_mm(x16, ps[i], None, isa))(copies)
        out.append(Variant(f"sparse {kind}", copies[0].nbytes(), len(copies), run))
    return out


@functools.cache
def _probe_weight() -> Packed:
    return pack_dense(prune(torch.randn(768, 4096), 0.7), "bf16")


def compute_probe(isa: str, clock: float | None) -> float | None:
    """Core cycles per 32 columns of the bf16 expand kernel, batch 1, on a 768x4096 weight at 70% that stays in
    L2: bound by computation alone, so it reads how much of the cores the kernels get now (4.2 at best on this
    Xeon, one thread). On this VM it moved between 4.2 and 7.4 within minutes with nothing else running in it,
    which the clock probe does not show."""
    if clock is None:
        return None
    packed = _probe_weight()
    x = torch.randn(1, 4096).bfloat16()
    for _ in range(20):
        dispatch.sparse_mm(x, packed, None, isa)
    blocks = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(40):
            dispatch.sparse_mm(x, packed, None, isa)
        blocks.append((time.perf_counter() - start) / 40)
    chunks_per_thread = 768 * 4096 / 32 / torch.get_num_threads()
    return round(statistics.median(blocks) * clock * 1e9 / chunks_per_thread, 2)


def prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    # Random positions: the kernels' speed depends on how many weights survive, not on which.
    keep = torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) >= sparsity
    return weight * keep


def time_round_robin(variants: list[Variant], reps: int) -> None:
    for v in variants:  # warm-up
        v.run(0)
    for _ in range(reps):
        for v in variants:
            v.measure()


def bench_shape(
    shape: tuple[int, int], sparsities: list[float], batches: list[int], reps: int, isa: str
) -> list[dict[str, Any]]:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fp32 = [weight.clone() for _ in range(copies_of(weight.numel() * 4))]
    bf16 = [weight.bfloat16() for _ in range(copies_of(weight.numel() * 2))]
    packs = {s: packed_copies(prune(weight, s)) for s in sparsities}
    rows: list[dict[str, Any]] = []
    for batch in batches:
        before, clock_before = copy_bandwidth(), dispatch.clock_ghz()
        probe_before = compute_probe(isa, clock_before)
        dense = dense_variants(fp32, bf16, batch, isa)
        sparse = {s: sparse_variants(packs[s], batch, isa) for s in sparsities}
        time_round_robin(dense + [v for vs in sparse.values() for v in vs], reps)
        after, clock_after = copy_bandwidth(), dispatch.clock_ghz()
        probe = median_known([probe_before, compute_probe(isa, clock_after)], 2)
        bandwidth = statistics.median([before, after])
        clock = median_known([clock_before, clock_after], 2)
        base = {v.name: v.median() for v in dense}
        best_bf16 = min(t for n, t in base.items() if "bf16" in n)
        for sparsity, variants in [(0.0, dense), *sparse.items()]:
            int8 = next((v.median() for v in variants if v.name == "sparse int8"), None)
            for v in variants:
                gbs = v.nbytes / v.median() / 1e9
                rows.append(
                    {
                        "shape": list(shape),
                        "batch": batch,
                        "sparsity": sparsity,
                        "variant": v.name,
                        "ms": round(v.median() * 1e3, 4),
                        "gb_s": round(gbs, 2),
                        "of_copy_bw": round(gbs / bandwidth, 3),
                        "copy_gb_s": round(bandwidth, 1),
                        "clock_ghz": clock,
                        "probe_cycles": probe,
                        "x_best_dense_bf16": round(best_bf16 / v.median(), 2),
                        "x_torch_fp32": round(base["torch fp32"] / v.median(), 2),
                        "x_sparse_int8": None if int8 is None else round(int8 / v.median(), 2),
                        "bits_per_weight": round(8 * v.nbytes / (shape[0] * shape[1]), 3),
                    }
                )
        print_rows([r for r in rows if r["batch"] == batch and r["shape"] == list(shape)])
    return rows


def print_rows(rows: list[dict[str, Any]]) -> None:
    head = rows[0]
    print(
        f"\n{head['shape'][0]}x{head['shape'][1]}  batch {head['batch']}  copy bandwidth {head['copy_gb_s']} GB/s  "
        f"clock {head['clock_ghz'] or 'n/a'} GHz  compute probe {head['probe_cycles'] or 'n/a'} cycles"
    )
    print(
        f"  {'sparsity':>8} {'variant':<16} {'bits/w':>7} {'ms':>9} {'GB/s':>7} {'of bw':>6} "
        f"{'x best dense bf16':>18} {'x torch fp32':>13} {'x int8':>7}"
    )
    for r in rows:
        x_int8 = "" if r["x_sparse_int8"] is None else f"{r['x_sparse_int8']:.2f}"
        print(
            f"  {r['sparsity']:>8.0%} {r['variant']:<16} {r['bits_per_weight']:>7.2f} {r['ms']:>9.3f} "
            f"{r['gb_s']:>7.1f} {r['of_copy_bw']:>6.0%} {r['x_best_dense_bf16']:>18.2f} {r['x_torch_fp32']:>13.2f} "
            f"{x_int8:>7}"
        )


def crossover(isa: str, reps: int) -> list[dict[str, Any]]:
    """Batch sizes at which the decompress + dense matmul path beats the kernels (4096x4096, 70%): the expand
    kernel, or the AMX kernel from 2 (bf16) or 5 (int8) tokens where the CPU has AMX, and there for int8 past 32
    tokens also the kernel with 16-bit activations, which the runtime takes for those."""
    weight = prune(torch.randn(4096, 4096), 0.7)
    wide_too = dispatch.amx_ready(isa)
    out = []
    print("\nprefill switch, 4096x4096 at 70%: sparse kernel vs decompress + dense matmul (ms)")
    for kind in ("bf16", "int8", "int4"):
        packed = pack_dense(weight, kind)  # type: ignore[arg-type]
        for batch in (4, 8, 16, 32, 64, 128, 256, 512):
            x = torch.randn(batch, 4096).bfloat16()
            kernel = Variant("kernel", 0, 1, lambda i, x=x, p=packed: dispatch.sparse_mm(x, p, None, isa))
            dense = Variant(
                "decompress", 0, 1, lambda i, x=x, p=packed: dispatch.decompressed_linear(x, p, None, isa)
            )
            variants = [kernel, dense]
            if kind == "int8" and wide_too and batch > dispatch.DENSE_ABOVE["int8"]:
                variants.append(
                    Variant(
                        "16-bit",
                        0,
                        1,
                        lambda i, x=x, p=packed: dispatch.sparse_mm(x, p, None, isa, wide=True),
                    )
                )
            time_round_robin(variants, reps)
            row = {
                "values": kind,
                "batch": batch,
                "kernel_ms": kernel.median() * 1e3,
                "decompress_ms": dense.median() * 1e3,
            }
            line = f"  {kind} batch {batch:>4}: kernel {row['kernel_ms']:8.2f}  decompress+matmul {row['decompress_ms']:8.2f}"
            if len(variants) > 2:
                row["kernel_16_bit_activations_ms"] = variants[2].median() * 1e3
                line += f"  kernel, 16-bit activations {row['kernel_16_bit_activations_ms']:8.2f}"
            out.append(row)
            print(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one shape, 70%% only, batch 1 (a smoke run)")
    parser.add_argument(
        "--batch-one",
        action="store_true",
        help="every shape at 70%%, batch 1 only, no prefill switch section",
    )
    parser.add_argument("--switch-only", action="store_true", help="only the prefill switch section")
    parser.add_argument("--output", default=None, help="result JSON (default: benchmarks/results/, dated)")
    args = parser.parse_args()
    if args.quick and args.switch_only:
        parser.error("--quick and --switch-only leave nothing to run together; choose one")
    isa = dispatch.current_isa()
    if isa == "torch":
        raise SystemExit("the C++ kernels are not available here; nothing to benchmark")
    shapes, sparsities, batches = SHAPES, SPARSITIES, BATCHES
    if args.quick or args.batch_one:
        shapes, sparsities, batches = (SHAPES[:1] if args.quick else SHAPES), [0.7], [1]
    print(f"kernels: {isa}, threads: {torch.get_num_threads()}, reps: {args.reps}")
    rows = (
        []
        if args.switch_only
        else [r for s in shapes for r in bench_shape(s, sparsities, batches, args.reps, isa)]
    )
    switch = crossover(isa, max(args.reps // 2, 1)) if not (args.quick or args.batch_one) else []

    print(
        "\ntargets at 70% sparsity, batch 1 (bf16 >= 2.0x best dense bf16; int8 >= 4.0x dense bf16, >= 8x torch "
        "fp32; int4 >= 1.4x the int8 kernel)"
    )
    for r in rows:
        if r["sparsity"] == 0.7 and r["batch"] == 1:
            x_int8 = "" if r["x_sparse_int8"] is None else f", {r['x_sparse_int8']:.2f}x sparse int8"
            print(
                f"  {r['shape'][0]}x{r['shape'][1]} {r['variant']:<12} {r['x_best_dense_bf16']:.2f}x dense bf16, "
                f"{r['x_torch_fp32']:.2f}x torch fp32{x_int8}  (compute probe {r['probe_cycles']} cycles)"
            )
    out = Path(args.output or result_path("cpu_kernels"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"isa": isa, "threads": torch.get_num_threads(), "rows": rows, "prefill_switch": switch}, indent=1
        )
    )
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
