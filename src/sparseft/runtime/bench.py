"""Measuring generation: prefill and decode tokens per second of decoder-only models; encoder latency and decoder
tokens per second of encoder-decoders (T5, Whisper); the bytes a model holds, its peak memory, the memory bandwidth.

Timings on a shared or throttled machine drift, so callers compare models side by side in one process,
alternating them run by run, and report medians with a copy-bandwidth probe and the core's clock beside them.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseft.hf import model_kind
from sparseft.runtime import dispatch
from sparseft.runtime.linear import SparseLinear


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors (parameters and buffers), shared storage counted once."""
    seen: dict[int, int] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def linear_bits(model: nn.Module, vocab_size: int) -> float | None:
    """Bits read per weight of the model's linears at decode (mask, values and scales for sparse ones), the LM
    head (`vocab_size` outputs) left out; None without linears."""
    stored = weights = 0
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.out_features != vocab_size:
            stored += module.packed.nbytes()
            weights += module.in_features * module.out_features
        elif isinstance(module, nn.Linear) and module.out_features != vocab_size:
            stored += module.weight.numel() * module.weight.element_size()
            weights += module.weight.numel()
    return round(8 * stored / weights, 2) if weights else None


def median_known(values: list[float | None], digits: int) -> float | None:
    """The median of the probes that read something (a clock probe reads None where it cannot), rounded."""
    known = [v for v in values if v is not None]
    return round(statistics.median(known), digits) if known else None


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), with its widest vector instructions: "AMD EPYC, avx2"."""
    name, flags = "unknown CPU", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown CPU":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value
    except OSError:
        pass
    widest = "avx512" if "avx512f" in flags.split() else "avx2" if "avx2" in flags.split() else "other"
    return f"{name}, {widest}"


def result_path(benchmark: str, directory: str = "benchmarks/results") -> str:
    """Where a benchmark's result JSON goes: one committed file per run, named by date and machine."""
    slug = "".join(c if c.isalnum() else "-" for c in cpu_name().lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return f"{directory}/{benchmark}_{time.strftime('%Y-%m-%d-%H%M')}_{slug}.json"


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """A STREAM-like copy: GB/s of bytes read plus bytes written, best of `repeats`."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


@torch.inference_mode()  # as `sparseft generate` runs; no_grad, generate's own default, costs 2 ms a token more
def _generate_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    # A random model would stop at any EOS; without one, generate makes exactly `new_tokens`. Not min_new_tokens:
    # its logits processor looks the EOS up in the whole vocabulary every step, 0.5-0.9 ms a token on a
    # 32000-token vocabulary, which no real decoding pays.
    # The own decoder reads None as "the model's end tokens" and [] as none; transformers reads None as none.
    ends: Any = [] if hasattr(model, "new_cache") else None
    model.generate(  # type: ignore[operator]
        input_ids, max_new_tokens=new_tokens, eos_token_id=ends, do_sample=False, pad_token_id=0
    )
    return time.perf_counter() - start


def measure_generation(
    models: dict[str, nn.Module], prompt_tokens: int = 128, new_tokens: int = 64, runs: int = 3, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Prefill and decode tokens/s of each model, alternating the models run by run; medians of `runs`.

    Prefill: a prompt of `prompt_tokens` random ids, one new token. Decode: the extra time of `new_tokens`
    new tokens over that, per extra token (greedy, no early stop)."""
    configs: list[Any] = [m.config for m in models.values()]
    vocab = min(int(c.vocab_size) for c in configs)
    ids = torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    for model in models.values():  # warm-up: first calls allocate caches and fill the allocator
        _generate_seconds(model, ids[:, :8], 2)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    bandwidth: list[float | None] = []
    clock: list[float | None] = []
    for _ in range(runs):
        bandwidth.append(copy_bandwidth(128, 3))
        clock.append(dispatch.clock_ghz())
        for name, model in models.items():
            first = _generate_seconds(model, ids, 1)
            full = _generate_seconds(model, ids, new_tokens)
            prefill[name].append(prompt_tokens / first)
            decode[name].append((new_tokens - 1) / max(full - first, 1e-9))
    return {
        name: {
            "prefill_tok_s": round(statistics.median(prefill[name]), 2),
            "decode_tok_s": round(statistics.median(decode[name]), 2),
            "model_bytes": model_bytes(model),
        }
        for name, model in models.items()
    } | {
        "_machine": {
            "threads": torch.get_num_threads(),
            "copy_gb_s": median_known(bandwidth, 1),
            "clock_ghz": median_known(clock, 2),
        }
    }


def source_ids(vocab_size: int, sentences: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """`sentences` rows of `tokens` random ids: source sentences for a translation model (speed does not depend
    on which tokens they are)."""
    return torch.randint(0, vocab_size, (sentences, tokens), generator=torch.Generator().manual_seed(seed))


def speech_features(config: Any, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.Tensor:
    """One window of random log-mel features, (1, mel bins, frames), made once in the model's dtype.

    Whisper's encoder takes only its full window: 30 s of 16 kHz audio is 3000 frames of 10 ms, which its
    convolution stem (strides 1 and 2) turns into `max_source_positions` = 1500 positions."""
    shape = (1, int(config.num_mel_bins), 2 * int(config.max_source_positions))
    return torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def seq2seq_inputs(
    config: Any,
    sentences: int = 32,
    source_tokens: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[list[dict[str, torch.Tensor]], dict[str, Any]]:
    """Random encoder inputs for `measure_seq2seq`, made once before any run, and their description: for a speech
    model one window of features in `dtype`, for a text model `sentences` sentences of `source_tokens` ids."""
    if model_kind(config) == "speech":
        features = speech_features(config, dtype, seed)
        # Whisper's frames are 10 ms apart (hop 160 at 16 kHz).
        return [{"input_features": features}], {"audio_seconds": features.shape[-1] / 100}
    ids = source_ids(int(config.vocab_size), sentences, source_tokens, seed)
    inputs = [{"input_ids": ids[i : i + 1]} for i in range(sentences)]  # views of one tensor
    return inputs, {"sentences": sentences, "source_tokens": source_tokens}


def _status_bytes(field: str) -> int | None:
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


def _reset_peak_rss() -> int | None:
    """Set the process's peak resident set (VmHWM) to its current size and return that size; None off Linux."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _timed(fn: Callable[[], object]) -> tuple[float, int | None]:
    """Seconds `fn()` took, and how far the resident set rose above its size at the start (None off Linux)."""
    start_rss = _reset_peak_rss()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return seconds, None if start_rss is None or peak is None else max(peak - start_rss, 0)


@torch.inference_mode()
def _encode_each(model: nn.Module, inputs: list[dict[str, torch.Tensor]]) -> None:
    encoder = model.get_encoder()  # type: ignore[operator]
    for kwargs in inputs:  # one at a time, so no output is kept past its own step
        encoder(**kwargs)


@torch.inference_mode()
def _generate_each(
    model: nn.Module, inputs: list[dict[str, torch.Tensor]], new_tokens: int, num_beams: int
) -> None:
    # Whisper's generation config sets max_length beside our max_new_tokens, and transformers warns about it on
    # every call; the warning says nothing about the measurement, so it is silenced for these calls only.
    with _quiet_transformers():
        for kwargs in inputs:
            model.generate(  # type: ignore[operator]
                **kwargs,
                num_beams=num_beams,
                max_new_tokens=new_tokens,
                # A random model would stop at any EOS; this fixes the work. Not eos_token_id=None as for the
                # decoder-only models: Whisper's own generate then stops after one token.
                min_new_tokens=new_tokens,
                do_sample=False,
            )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _seq2seq_run(
    model: nn.Module, inputs: list[dict[str, torch.Tensor]], new_tokens: int, num_beams: int
) -> dict[str, Any]:
    encode, _ = _timed(lambda: _encode_each(model, inputs))
    total, rise = _timed(lambda: _generate_each(model, inputs, new_tokens, num_beams))
    return {
        "encoder_ms": 1000 * encode / len(inputs),
        "decode_tok_s": len(inputs) * new_tokens / max(total - encode, 1e-9),
        "job_s": total,
        "rise": rise,
    }


def measure_seq2seq(
    models: dict[str, nn.Module],
    inputs: list[dict[str, torch.Tensor]],
    new_tokens: int,
    num_beams: int = 1,
    runs: int = 3,
) -> dict[str, dict[str, Any]]:
    """Encoder latency, decoder tokens/s, job time and peak memory of each encoder-decoder on the same `inputs`.

    `inputs` are the encoder's keyword arguments, one dict per sentence or audio window, run one at a time as a
    latency-bound server would. The models alternate run by run, and so does which goes first; medians of `runs`.
    - encoder_ms: the encoder alone, per input;
    - decode_tok_s: `new_tokens` per input (with beams, tokens of the answer, not of every beam) over the time
      of `generate` less the encoder's;
    - job_s: the time of `generate` over all inputs;
    - peak_bytes: the model's tensors plus the largest rise of the resident set during a run (activations,
      caches, beams); None where the process's peak cannot be reset (off Linux). The allocator may reuse
      memory the other model freed, so read it as a lower bound.
    """
    first = inputs[:1]
    for model in models.values():  # warm-up: first calls allocate caches and fill the allocator
        _encode_each(model, first)
        _generate_each(model, first, 2, num_beams)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
    bandwidth: list[float | None] = []
    clock: list[float | None] = []
    for run in range(runs):
        bandwidth.append(copy_bandwidth(128, 3))
        clock.append(dispatch.clock_ghz())
        order = list(models) if run % 2 == 0 else list(reversed(models))
        for name in order:
            rows[name].append(_seq2seq_run(models[name], inputs, new_tokens, num_beams))
    result: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        weights = model_bytes(model)
        rises = [row["rise"] for row in rows[name] if row["rise"] is not None]
        result[name] = {
            key: round(statistics.median(row[key] for row in rows[name]), 3)
            for key in ("encoder_ms", "decode_tok_s", "job_s")
        } | {"model_bytes": weights, "peak_bytes": weights + max(rises) if rises else None}
    result["_machine"] = {
        "threads": torch.get_num_threads(),
        "copy_gb_s": median_known(bandwidth, 1),
        "clock_ghz": median_known(clock, 2),
    }
    return result
