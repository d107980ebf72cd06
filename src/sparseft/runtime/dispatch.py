"""Which kernel runs: the instruction-set level and the small-batch / large-batch choice, in one place.

Levels, best first: "avx512" (VBMI2 expand + BF16 + VNNI), "avx2", "scalar" (portable C++), "torch" (no C++;
the plain-torch reference). The default is the best the CPU reports; `SPARSEFT_ISA=avx2` (or `set_isa`)
forces a level, for tests and comparisons. At that level, batches of 2 (bf16) or 5 (int8) tokens and more run on
the AMX kernels where the CPU and Linux allow it (`amx_ready`; SPARSEFT_AMX=0 turns them off), int8 values with
16-bit activations past 32 tokens. Inputs with more tokens than `dense_above(...)` take the
decompress-then-dense-matmul path: for long prompts torch's dense GEMM (oneDNN, AMX where present) beats
re-expanding every weight chunk for every pass of tokens.
A GPU branch belongs in `linear` next to the CPU one.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from sparseft.errors import SparseftError
from sparseft.runtime import reference
from sparseft.runtime.build import extension, load_extension
from sparseft.runtime.packing import Packed

LEVELS = {"scalar": 1, "avx2": 2, "avx512": 3}
CHOICES = ("auto", "torch", *LEVELS)
_forced: dict[str, str] = {}


def set_isa(name: str | None) -> None:
    """Force an instruction-set level for this process ("auto" or None: back to the default)."""
    if name is not None and name not in CHOICES:
        raise SparseftError(f"unknown instruction set {name!r}; choose one of {', '.join(CHOICES)}")
    _forced.pop("isa", None)
    if name not in (None, "auto"):
        _forced["isa"] = name


@functools.cache
def best_isa() -> str:
    """The best level this machine can run ("torch" if the C++ kernels could not be built)."""
    if not load_extension():
        return "torch"
    level = int(extension().best_isa())
    return next(name for name, value in LEVELS.items() if value == level)


def forget_kernels() -> None:
    """Drop what this process decided about the kernels, so the next call looks again (after a rebuild)."""
    for cached in (best_isa, _resolve_isa, _ops, _op, _amx_supported, _intel_cpu):
        cached.cache_clear()


def available_isas() -> list[str]:
    best = best_isa()
    return ["torch"] if best == "torch" else ["torch", *[n for n, v in LEVELS.items() if v <= LEVELS[best]]]


def current_isa() -> str:
    # Runs for every linear of every decoded token: the checks are cached per setting.
    return _resolve_isa(_forced.get("isa") or os.environ.get("SPARSEFT_ISA", "auto"))


@functools.cache
def _resolve_isa(name: str) -> str:
    if name not in CHOICES:
        raise SparseftError(f"SPARSEFT_ISA={name!r} is not one of {', '.join(CHOICES)}")
    if name == "auto":
        return best_isa()
    if name not in available_isas():
        raise SparseftError(
            f"instruction set {name!r} is not available here (best: {best_isa()}); unset SPARSEFT_ISA"
        )
    return name


# Above this many tokens per call, decompress and use the dense matmul: the expand kernels' cost grows with every
# token (one multiply-add per 32 or 64 weights per token), the dense path's barely does. Each switch is where the
# two crossed in benchmarks/cpu_kernels.py's crossover section (docs/BENCHMARKS.md, "Earlier measurements").
DENSE_ABOVE = {
    "bf16": 8,
    "int8": 32,
    "int4": 32,
    "dense": 8,
}  # "dense": our dense bf16 GEMV (linear.DenseLinear)
# With AMX the tile kernels keep ahead of decompressing to far longer prompts. int8 values past 32 tokens take
# 16-bit activations (int8_wide_amx): the 8-bit kernel would be faster still, but it would quantize a prompt's
# activations to 8 bits where decompressing keeps them bf16.
AMX_DENSE_ABOVE = {"bf16": 2048, "int8": 1024}
# Off Intel (Zen 4, whose small tiles use vdpbf16ps) the bf16 expand kernel keeps ahead of decompressing longer.
OTHER_DENSE_ABOVE = {"bf16": 32}
# On AVX2 too: without a native bf16 matmul the decompressed path multiplies in fp32, and the bf16 kernel stays
# ahead of it to 32-48 tokens (cpu_kernels_2026-12-07-1732_amd-epyc-avx2.json's crossover section).
AVX2_DENSE_ABOVE = {"bf16": 32}
_DECOMPRESS_BYTES = 8 * 2**20


def dense_above(kind: str, isa: str | None = None) -> int:
    """Batches of more tokens than this take the decompress-then-dense-matmul path."""
    env = os.environ.get("SPARSEFT_DENSE_ABOVE")
    if env:
        return _parse_count(env)
    if kind in AMX_DENSE_ABOVE and amx_ready(isa):
        return AMX_DENSE_ABOVE[kind]
    if kind in OTHER_DENSE_ABOVE and (isa or current_isa()) == "avx512" and not _intel_cpu():
        return OTHER_DENSE_ABOVE[kind]
    if kind in AVX2_DENSE_ABOVE and (isa or current_isa()) == "avx2":
        return AVX2_DENSE_ABOVE[kind]
    return DENSE_ABOVE[kind]


def amx_ready(isa: str | None = None) -> bool:
    """Whether batches of 2 (bf16 values) or 5 (int8) tokens and more run on the AMX kernels: the CPU has AMX,
    Linux lets this process use it, the AVX-512 kernels are in use (`isa`, by default the current level) and
    SPARSEFT_AMX is not 0."""
    # the hardware last: asking Linux for the tile registers is for processes that would use them
    return (isa or current_isa()) == "avx512" and os.environ.get("SPARSEFT_AMX") != "0" and _amx_supported()


@functools.cache
def _intel_cpu() -> bool:
    return bool(_op("intel_cpu")())


@functools.cache
def _amx_supported() -> bool:
    return best_isa() == "avx512" and bool(_op("amx_supported")())


@functools.cache
def _parse_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SparseftError(f"SPARSEFT_DENSE_ABOVE={text!r} is not a whole number of tokens") from None


@functools.cache
def _ops() -> Any:
    if not load_extension():
        raise SparseftError("the C++ CPU kernels could not be built here; use SPARSEFT_ISA=torch")
    return extension()


@functools.cache
def _op(name: str) -> Any:
    # Looked up once: a module attribute lookup per call adds up over some 180 calls a decoded token.
    return getattr(_ops(), name)


def sparse_mm(
    x: torch.Tensor, p: Packed, bias: torch.Tensor | None, isa: str, wide: bool = False
) -> torch.Tensor:
    """The sparse kernels (any batch), or their reference under "torch". `wide`: int8 values times 16-bit
    activations rather than 8-bit (AMX only)."""
    if isa == "torch":
        return reference.sparse_mm(x, p, bias, activation_bits=16 if wide else 8)
    return _op("sparse_mm")(
        x, p.mask, p.values, p.row_start, p.scale, p.rowsum, bias, p.shape[1], LEVELS[isa], wide, p.group_size
    )


def decompress(p: Packed, isa: str) -> torch.Tensor:
    if isa == "torch":
        return reference.decompress(p)
    return _op("decompress")(p.mask, p.values, p.row_start, p.scale, p.shape[1], LEVELS[isa], p.group_size)


def linear(x: torch.Tensor, p: Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + bias for a compressed W, choosing the kernel for this device, CPU and batch."""
    if x.is_cuda:  # Triton kernels over a tile repacking of `p` (needs `pip install sparseft[gpu]`)
        from sparseft.runtime.triton_kernels import runtime_linear

        return runtime_linear(x, p, bias)
    isa = current_isa()
    if not x.is_contiguous():
        x = x.contiguous()
    tokens = x.numel() // p.shape[1] if p.shape[1] else 0
    # decoding (few tokens, no override) skips the AMX checks: a microsecond on each of some 100 calls a token
    few = tokens <= DENSE_ABOVE[p.kind] and not os.environ.get("SPARSEFT_DENSE_ABOVE")
    if few:
        return sparse_mm(x, p, bias, isa)
    if tokens <= dense_above(p.kind, isa):
        # int8 prompts past the 8-bit kernels' range keep their activations' precision (16 bits)
        wide = p.kind == "int8" and tokens > DENSE_ABOVE["int8"] and amx_ready(isa)
        return sparse_mm(x, p, bias, isa, wide)
    return decompressed_linear(x, p, bias, isa)


def check_packed(p: Packed) -> None:
    """A SparseftError unless every row's offsets agree with its mask bits (which the kernels trust); a no-op
    where the C++ kernels are not built (the torch path reads no raw memory)."""
    if best_isa() == "torch":
        return
    try:
        _op("check_packed")(p.mask, p.values, p.row_start, p.shape[1], p.group_size)
    except RuntimeError as e:
        reason = str(e).splitlines()[0].removeprefix("sparseft: ")
        raise SparseftError(
            f"a packed weight is inconsistent ({reason}); build it with pack_dense or pack_bitmask"
        ) from None


@functools.cache
def native_bf16_matmul() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Elsewhere torch's bf16 matmul is several
    times slower than converting to fp32 and multiplying there (4x on an AVX2 EPYC at prefill shapes)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def decompressed_linear(x: torch.Tensor, p: Packed, bias: torch.Tensor | None, isa: str) -> torch.Tensor:
    """The path for many tokens: decompress W and use torch's dense bf16 matmul."""
    # A block of rows at a time: decompressing a fused gate/up weight of a 1B model whole (46 MB) at prefill raised
    # the whole model's peak memory by a fifth; 8 MB blocks cost a few percent of prefill time.
    step = max(1, _DECOMPRESS_BYTES // (2 * max(p.shape[1], 1)))
    xb = x.to(torch.bfloat16)
    parts = []
    for start in range(0, p.shape[0], step):
        stop = min(start + step, p.shape[0])
        dense = decompress(p.rows(start, stop), isa)
        part_bias = None if bias is None else bias[start:stop]
        if x.dtype == torch.float32 or not native_bf16_matmul():
            # as the kernels: bf16-rounded inputs, products and sums in fp32
            fp32_bias = None if part_bias is None else part_bias.float()
            parts.append(torch.nn.functional.linear(xb.float(), dense.float(), fp32_bias).to(x.dtype))
            del dense
            continue
        if part_bias is None or x.dtype == torch.bfloat16:
            fused = None if part_bias is None else part_bias.to(xb.dtype)
            parts.append(torch.nn.functional.linear(xb, dense, fused).to(x.dtype))
        else:  # the bias in the input's dtype, not rounded to bf16 first (the kernels add it in fp32)
            parts.append(torch.nn.functional.linear(xb, dense).to(x.dtype) + part_bias.to(x.dtype))
        del dense
    return parts[0] if len(parts) == 1 else torch.cat(parts, -1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A Llama-style RMSNorm in one C++ op (see runtime/norm.py)."""
    return _op("rms_norm")(x, weight, eps)


def rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x * cos + rotate_half(x) * sin for x = q and k, in one C++ op (kernels/rotary.cpp; runtime/models/ops.py); a RuntimeError for
    shapes, dtypes or layouts it does not cover."""
    return _op("rotary")(q, k, cos, sin)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one new token (q of shape (B, H, 1, D)) over all cached keys and values (B, Hkv, L, D) in one
    C++ op (see runtime/attention.py); returns (B, 1, H, D). A RuntimeError for what it does not cover."""
    return _op("decode_attention")(q, k, v, scale, LEVELS[current_isa()])


def clock_ghz() -> float | None:
    """The core's clock now (see kernels/ops.cpp), or None where the C++ kernels are not built or cannot read it."""
    if best_isa() == "torch":
        return None
    ghz = float(_op("clock_ghz")())
    return round(ghz, 2) if ghz > 0 else None


def dense_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dense bf16 y = x W^T with the AVX-512 GEMV kernel where available (the decode-time LM head)."""
    if current_isa() != "avx512":
        y = torch.nn.functional.linear(x.to(weight.dtype), weight)
        return (y if bias is None else y.float() + bias.float()).to(
            x.dtype
        )  # the bias in fp32, as the kernel
    return _op("dense_mm")(x.contiguous(), weight, bias)


def store_and_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    position: int,
    first: int,
    scale: float,
) -> torch.Tensor:
    """A decoding step's keys and values k, v (B, Hkv, 1, D) written to row `position` of the caches (B, Hkv,
    capacity, D), then `decode_attention` of q over their rows [first, position], in one C++ op
    (kernels/attention.cpp); a RuntimeError, with nothing written, for what it does not cover."""
    return _op("store_and_attend")(
        q, k, v, key_cache, value_cache, position, first, scale, LEVELS[current_isa()]
    )


def layer_stack(heads: int, kv_heads: int, head_dim: int, eps: float, scale: float) -> Any:
    """An empty C++ `LayerStack` (kernels/decode_step.cpp; runtime/models/step.py fills it)."""
    return _op("LayerStack")(heads, kv_heads, head_dim, eps, scale)


def whisper_stack(heads: int, head_dim: int, eps: float, scale: float) -> Any:
    """An empty C++ `WhisperStack` (kernels/decode_step.cpp; runtime/models/step.py fills it)."""
    return _op("WhisperStack")(heads, head_dim, eps, scale)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of the last dimension times its second half, in one C++ op (kernels/activation.cpp;
    runtime/models/ops.py); a RuntimeError for what it does not cover."""
    return _op("silu_mul")(gate_up, LEVELS[current_isa()])
