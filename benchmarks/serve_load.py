"""`sparseft serve` under load: aggregate tokens/s, time to first token and time between tokens at 1, 2, 4 and 8
concurrent streaming clients, against `sparseft generate`'s single stream in the same run, and against llama.cpp's
llama-server on the same weights (Q8_0, Q4_0) where it is built.

    .venv/bin/python benchmarks/serve_load.py [--passes 2] [--clients 1,2,4,8] [--new-tokens 128]
        [--workdir /tmp/sparseft-decode] [--threads 2] [--llama-server PATH] [--output FILE]

The model is cpu_decode.py's TinyLlama-shaped Llama pruned to 70% (made there once, in --workdir), served from its
int8 archive with the LM head in int8, with a word-level tokenizer of its 32000 ids made here (the weights are
random: what matters is the bytes read per step) and no end token, so every request makes exactly --new-tokens
tokens. Each client sends its requests one after another over loopback HTTP (/v1/completions, prompt as token ids
of 32-256 tokens, streamed, greedy); a level of N clients sends the first max(2, N) prompts of one fixed set, and
the single stream runs the first two one after another. Times are taken when each server-sent chunk arrives. Per
pass, in turn: the single stream (the runtime's `generate` in this process, timed as `sparseft generate` reports
it: new tokens over the whole call, prefill included), then each server at each level.
Medians over passes, a copy-bandwidth probe per pass. The client threads and the server share the machine's cores.

llama-server: built from the llama-cpp-python source distribution's vendored llama.cpp (see llamacpp.py for the
venv; `cmake -S .../vendor/llama.cpp -B build -DLLAMA_CURL=OFF && cmake --build build --target llama-server`), run
with the same threads, 8 slots and continuous batching, `ignore_eos`. Where it is missing, one line says so.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import torch
import transformers
from cpu_decode import prepare

from sparseft import runtime
from sparseft.runtime.bench import copy_bandwidth, cpu_name, result_path

DEFAULT_SERVER = Path("~/.cache/sparseft-llamacpp/server-build/bin/llama-server").expanduser()


def word_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    """One word per id ("w0" .. "w31999"): a tokenizer for a model whose ids mean nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def serve_dir(workdir: Path) -> Path:
    """The int8 archive with a tokenizer and no end token, for both the server and the single stream."""
    out = workdir / "serve-int8"
    if not (out / "tokenizer.json").exists():
        out.mkdir(exist_ok=True)
        source = workdir / "archive-int8"
        for item in source.iterdir():
            if item.name != "config.json" and not (out / item.name).exists():
                (out / item.name).symlink_to(item)
        config = json.loads((source / "config.json").read_text())
        config["model_config"]["eos_token_id"] = None
        (out / "config.json").write_text(json.dumps(config, indent=2))
        word_tokenizer(config["model_config"]["vocab_size"]).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server process on a free loopback port, ready once its /health answers 200."""

    def __init__(self, name: str, command: list[str], port: int, extra: dict[str, Any]) -> None:
        self.name, self.port, self.extra = name, port, extra
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited: {self.process.stderr.read()[-2000:] if self.process.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def stream(self, prompt: list[int], new_tokens: int) -> tuple[float, list[float], int]:
        """One streamed greedy completion: seconds to the first token, the gaps between tokens, tokens made."""
        body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True, **self.extra}
        times: list[float] = []
        started = time.perf_counter()
        url = f"http://127.0.0.1:{self.port}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
        if not times:
            raise RuntimeError(f"{self.name} sent no text")
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return times[0] - started, gaps, len(times)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def level(server: Server, clients: int, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """`clients` threads sending `prompts` between them, each its share one after another."""
    results: list[tuple[float, list[float], int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client(mine: list[list[int]]) -> None:
        for prompt in mine:
            try:
                outcome = server.stream(prompt, new_tokens)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                return
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(prompts[i::clients],)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{server.name}: {errors[0]!r}")
    tokens = sum(r[2] for r in results)
    gaps = sorted(g for r in results for g in r[1])
    firsts = sorted(r[0] for r in results)

    def pct(values: list[float], p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))] * 1000

    return {
        "tok_s": tokens / wall,
        "tokens": tokens,
        "ttft_p50_ms": pct(firsts, 0.5),
        "ttft_p95_ms": pct(firsts, 0.95),
        "tbt_p50_ms": pct(gaps, 0.5),
        "tbt_p95_ms": pct(gaps, 0.95),
    }


def single_stream(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    """tokens/s as `sparseft generate` reports it (new tokens over the whole call, prefill included), over
    `prompts` one after another."""
    tokens = 0
    started = time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            tokens += model.generate(ids, max_new_tokens=new_tokens).shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - started)


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/sparseft-decode")
    parser.add_argument("--layers", type=int, default=22, help="fewer layers for a quick smoke run")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_SERVER)
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--output", help="default: benchmarks/results/serve_load_DATE_CPU.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    workdir = Path(args.workdir) / f"layers{args.layers}-s0.7"
    prepare(workdir, args.layers, 0.7)
    model_dir = serve_dir(workdir)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    vocab = json.loads((model_dir / "config.json").read_text())["model_config"]["vocab_size"]
    # one prompt set for every runner and level: the single stream and each server's level of N clients take the
    # first max(2, N) prompts, so all compare on the same work
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 256))] for _ in range(max(2, *levels))]

    port = free_port()
    sparseft_cmd = [
        sys.executable, "-m", "sparseft.cli", "serve", str(model_dir), "--port", str(port), "--threads",
        str(args.threads), "--max-batch", "8", "--context", "512", "--head-values", "int8", "--model-name", "m",
    ]  # fmt: skip
    servers = [Server("sparseft serve int8", sparseft_cmd, port, {"model": "m"})]
    llama_server = args.llama_server
    if args.skip_llamacpp:
        pass
    elif not llama_server.exists():
        print(f"llama-server skipped: not built at {llama_server} (see this file's docstring)")
    else:
        for quant in ("Q8_0", "Q4_0"):
            gguf = workdir / "gguf" / f"dense-{quant}.gguf"
            if not gguf.exists():
                print(f"llama-server {quant} skipped: run benchmarks/cpu_decode.py first to make {gguf}")
                continue
            port = free_port()
            command = [
                str(llama_server), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads),
                "-c", str(8 * 512), "-np", "8", "--host", "127.0.0.1", "--port", str(port),
            ]  # fmt: skip
            servers.append(
                Server(f"llama-server {quant}", command, port, {"ignore_eos": True, "cache_prompt": False})
            )
    single_model = runtime.load(model_dir, head_values="int8")
    print(f"{cpu_name()}, {args.threads} threads; servers: {', '.join(s.name for s in servers)}", flush=True)

    passes: list[dict[str, Any]] = []
    try:
        for number in range(args.passes):
            record: dict[str, Any] = {"copy_gb_s": copy_bandwidth()}
            record["sparseft generate"] = single_stream(single_model, prompts[:2], args.new_tokens)
            for server in servers:
                for clients in levels:
                    record[f"{server.name} x{clients}"] = level(
                        server, clients, prompts[: max(2, clients)], args.new_tokens
                    )
            record["copy_gb_s_after"] = copy_bandwidth()
            passes.append(record)
            print(f"pass {number + 1}/{args.passes} done", flush=True)
    finally:
        for server in servers:
            server.close()

    single = statistics.median(p["sparseft generate"] for p in passes)
    table: dict[str, Any] = {}
    for key in passes[0]:
        if isinstance(passes[0][key], dict):
            table[key] = {f: statistics.median(p[key][f] for p in passes) for f in passes[0][key]}
    print(f"\nsingle stream (sparseft generate, int8 + int8 head): {single:.2f} tok/s")
    print(
        f"{'server x clients':<28} {'tok/s':>7} {'vs single':>9} {'TTFT p50/p95 ms':>17} {'TBT p50/p95 ms':>16}"
    )
    for key, row in table.items():
        row["vs_single_stream"] = row["tok_s"] / single
        print(
            f"{key:<28} {row['tok_s']:>7.2f} {row['vs_single_stream']:>8.2f}x "
            f"{row['ttft_p50_ms']:>8.0f}/{row['ttft_p95_ms']:<8.0f} {row['tbt_p50_ms']:>7.0f}/{row['tbt_p95_ms']:<8.0f}"
        )
    ratios = {}
    for quant in ("Q8_0", "Q4_0"):
        for clients in levels:
            ours, theirs = (
                table.get(f"sparseft serve int8 x{clients}"),
                table.get(f"llama-server {quant} x{clients}"),
            )
            if ours and theirs:
                ratios[f"x{clients} vs {quant}"] = ours["tok_s"] / theirs["tok_s"]
    for key, ratio in ratios.items():
        print(f"sparseft serve / llama-server, {key}: {ratio:.2f}x")
    bandwidth = [p[k] for p in passes for k in ("copy_gb_s", "copy_gb_s_after")]
    print(f"copy bandwidth {min(bandwidth):.1f}-{max(bandwidth):.1f} GB/s over the run")
    result = {
        "cpu": cpu_name(),
        "threads": args.threads,
        "layers": args.layers,
        "new_tokens": args.new_tokens,
        "passes": passes,
        "single_stream_tok_s": single,
        "levels": table,
        "vs_llama_server": ratios,
        "targets": {
            "x4 vs single >= 2.5": table.get("sparseft serve int8 x4", {}).get("vs_single_stream"),
            "x1 vs single >= 0.9": table.get("sparseft serve int8 x1", {}).get("vs_single_stream"),
        },
    }
    output = Path(args.output or result_path("serve_load"))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, output)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
