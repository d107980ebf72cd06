"""`sparseft serve` as a real process on a free loopback port: the openai client, SIGTERM, and a bounded load."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparseft.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    def __init__(self, model_dir: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "sparseft.cli", "serve", str(model_dir), "--port", str(self.port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            [*command, *options], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, (
                f"the server exited: {self.process.stdout.read() if self.process.stdout else ''}"
            )
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def metrics(self) -> dict[str, float]:
        found = {}
        for family in text_string_to_metric_families(httpx.get(f"{self.url}/metrics").text):
            for sample in family.samples:
                labels = ",".join(f"{v}" for _, v in sorted(sample.labels.items()))
                found[f"{sample.name}[{labels}]" if labels else sample.name] = sample.value
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            if self.process.stdout:
                self.process.stdout.close()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    running = Server(model_dir, "--max-batch", "8", "--context", "256", "--threads", "1")
    yield running
    running.stop()


def test_bad_arguments_are_one_line_errors(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--context", "100000"]) == 2
    assert "past the model's 512 positions" in capsys.readouterr().err
    assert main(["serve", str(model_dir), "--max-batch", "0"]) == 2
    assert "max_batch must be at least 1" in capsys.readouterr().err


def test_a_load_of_mixed_requests_all_end_cleanly(server: Server) -> None:
    """16 clients, 200 requests: chat and text, streamed and whole, a sixth cancelled mid-stream."""
    client = server.client
    rng = random.Random(0)
    words = ["def", "class", "import", "return", "for", "while", "with", "yield", "lambda", "value", "index"]
    plans = [
        (i % 6, rng.randint(4, 24), " ".join(rng.choices(words, k=rng.randint(1, 40)))) for i in range(200)
    ]
    warm = [client.completions.create(model="tiny-llama", prompt=p, max_tokens=n) for _, n, p in plans[:16]]
    assert all(w.choices[0].finish_reason for w in warm)
    rss_before, before = server.rss_mb(), server.metrics()

    def one(plan: tuple[int, int, str]) -> tuple[str, int]:
        kind, tokens, prompt = plan
        messages = [{"role": "user", "content": prompt}]
        if kind == 0:
            done = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=tokens)
            return done.choices[0].finish_reason, done.usage.completion_tokens
        if kind == 1:
            chat = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=tokens)
            return chat.choices[0].finish_reason or "", chat.usage.completion_tokens
        if kind == 5:  # leaves after the first piece of text
            with httpx.stream(
                "POST",
                f"{server.url}/v1/completions",
                json={"model": "tiny-llama", "prompt": prompt, "max_tokens": 200, "stream": True},
            ) as response:
                next(response.iter_lines())
            return "left", 0
        chunks = list(
            client.chat.completions.create(
                model="tiny-llama",
                messages=messages,
                max_tokens=tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
            if kind % 2
            else client.completions.create(
                model="tiny-llama",
                prompt=prompt,
                max_tokens=tokens,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(finish) == 1 and chunks[-1].usage is not None
        return finish[0], chunks[-1].usage.completion_tokens

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, plans, timeout=300))
    assert time.monotonic() - started < 300
    finished = [o for o in outcomes if o[0] != "left"]
    assert {o[0] for o in finished} <= {"stop", "length"}
    deadline = time.monotonic() + 30
    while server.metrics()["sparseft_running_requests"] or server.metrics()["sparseft_queue_length"]:
        assert time.monotonic() < deadline, "requests left running after their clients"
        time.sleep(0.05)
    after = server.metrics()

    def grew(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    # a client that left may have seen its whole text first (an end token right away): then it ended, not aborted
    ended = grew("sparseft_finished_total[stop]") + grew("sparseft_finished_total[length]")
    assert ended >= len(finished) and ended + grew("sparseft_finished_total[abort]") == len(outcomes)
    ok = grew("sparseft_requests_total[/v1/completions,200]") + grew(
        "sparseft_requests_total[/v1/chat/completions,200]"
    )
    assert ok == len(outcomes)
    assert grew("sparseft_generated_tokens_total") >= sum(o[1] for o in finished)
    assert server.rss_mb() < rss_before + 64, (
        f"memory grew from {rss_before:.0f} MB to {server.rss_mb():.0f} MB"
    )
    assert threading.active_count() < 20


def test_sigterm_lets_the_running_request_finish_then_exits(server: Server) -> None:
    """Last in this file: it stops the module's server."""
    stream = server.client.completions.create(
        model="tiny-llama", prompt="x", max_tokens=200, temperature=1.0, seed=1, stream=True
    )
    chunks = iter(stream)
    next(chunks)
    server.process.send_signal(signal.SIGTERM)
    with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):  # refused, or 503
        server.client.completions.create(model="tiny-llama", prompt="y", max_tokens=2)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason in ("stop", "length")
    assert server.stop() in (0, -signal.SIGTERM)  # uvicorn ends by the signal it caught, once shut down
