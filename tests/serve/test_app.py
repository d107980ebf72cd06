from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sparseft.serve import load_engine
from sparseft.serve.app import create_app
from sparseft.serve.engine import Job, Sampling

NAME = "tiny"


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    return load_engine(model_dir, max_batch=4, context=256, prefill_chunk=8)


@pytest.fixture(scope="module")
def url(engine: Any, serving: Any) -> Iterator[str]:
    with serving(create_app(engine, NAME)) as url:
        yield url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def chat(client: openai.OpenAI, text: str, **options: Any) -> Any:
    return client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": text}], temperature=0, **options
    )


def test_the_model_list_and_health(client: openai.OpenAI, url: str) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_chat_whole_and_streamed_give_the_same_text_and_usage(client: openai.OpenAI, engine: Any) -> None:
    whole = chat(client, "def parse(line):", max_tokens=20)
    chunks = list(
        chat(client, "def parse(line):", max_tokens=20, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason] and finishes[0] in ("stop", "length")
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "def parse(line):"}], tokenize=False, add_generation_prompt=True
    )
    assert whole.usage.prompt_tokens == len(engine.tokenizer(prompt, add_special_tokens=False).input_ids)
    assert chunks[-1].usage == whole.usage and 1 <= whole.usage.completion_tokens <= 20


def test_completions_whole_and_streamed(client: openai.OpenAI, url: str) -> None:
    whole = client.completions.create(model=NAME, prompt="import os\n", max_tokens=12, temperature=0)
    streamed = client.completions.create(
        model=NAME, prompt="import os\n", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    raw = httpx.post(
        f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 3, "stream": True}
    ).text
    assert raw.endswith("data: [DONE]\n\n") and raw.startswith("data: {")


def test_a_stop_string_cuts_the_text(client: openai.OpenAI) -> None:
    free = (
        client.completions.create(model=NAME, prompt="class A:", max_tokens=24, temperature=0).choices[0].text
    )
    stop = free[len(free) // 2 :][:2]
    cut = client.completions.create(model=NAME, prompt="class A:", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == free[: free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_concurrent_greedy_requests_give_the_texts_they_give_alone(client: openai.OpenAI) -> None:
    prompts = ["x", "def f(a, b):\n    return", "import sys\n" * 6, "for line in open(path):"]
    alone = [chat(client, p, max_tokens=16).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(
            pool.map(lambda p: chat(client, p, max_tokens=16).choices[0].message.content, prompts)
        )
    assert together == alone


def test_sampling_with_a_seed_repeats(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=NAME, prompt="def", max_tokens=12, temperature=1.2, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(3) == sample(3)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    return dict(body["error"])


def test_bad_requests_get_openai_errors(client: openai.OpenAI, url: str) -> None:
    broken = httpx.post(
        f"{url}/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400 and "not valid JSON" in error_of(broken)["message"]
    unknown = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "best_of": 3})
    assert unknown.status_code == 400 and error_of(unknown)["param"] == "best_of"
    with pytest.raises(openai.BadRequestError, match="context is 256 tokens"):
        client.completions.create(model=NAME, prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="x", temperature=-1)
    missing = httpx.get(f"{url}/v1/nothing")
    assert missing.status_code == 404 and error_of(missing)["type"] == "not_found_error"


def test_a_tokenizer_without_a_chat_template_is_a_clear_error(
    client: openai.OpenAI, engine: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        chat(client, "hi")


def test_a_client_that_leaves_mid_stream_frees_its_slot(url: str) -> None:
    before = metrics(url).get("sparseft_finished_total{reason=abort}", 0)
    body = {"model": NAME, "prompt": "x", "max_tokens": 240, "stream": True, "temperature": 1.0, "seed": 0}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        next(response.iter_lines())
    deadline = time.monotonic() + 30
    while metrics(url).get("sparseft_finished_total{reason=abort}", 0) == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.02)
    assert metrics(url)["sparseft_running_requests"] == 0


class Held:
    """The model, held before each forward until `release` is set."""

    def __init__(self, net: Any) -> None:
        self.net, self.release = net, threading.Event()
        self.config, self.generation_config = net.config, net.generation_config

    def new_slots(self, *args: Any) -> Any:
        return self.net.new_slots(*args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.release.wait(30)
        return self.net(*args, **kwargs)


def test_a_full_server_answers_503_with_retry_after(model_dir: Path, serving: Any) -> None:
    engine = load_engine(model_dir, max_batch=1, max_queue=0, context=64)
    held = engine.model = Held(engine.model)
    with serving(create_app(engine, NAME)) as url:
        engine.submit(Job([5, 6, 7], 4, Sampling(temperature=0)))  # takes the only slot, held
        time.sleep(0.2)
        busy = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert error_of(busy)["code"] == "server_busy"
        held.release.set()


def test_an_api_key_is_asked_for(model_dir: Path, serving: Any) -> None:
    engine = load_engine(model_dir, max_batch=1, context=64)
    with serving(create_app(engine, NAME, api_key="sesame")) as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="open", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/metrics").status_code == 401
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in right.models.list().data] == [NAME]
        assert httpx.get(f"{url}/health").status_code == 200


def test_metrics_count_requests_and_tokens(client: openai.OpenAI, url: str) -> None:
    before = metrics(url)
    done = [
        client.completions.create(model=NAME, prompt="a = ", max_tokens=5, temperature=0) for _ in range(3)
    ]
    after = metrics(url)
    key = "sparseft_requests_total{endpoint=/v1/completions,status=200}"
    assert after[key] - before.get(key, 0) == 3
    tokens = sum(d.usage.completion_tokens for d in done)
    assert after["sparseft_generated_tokens_total"] - before["sparseft_generated_tokens_total"] == tokens
    assert json.loads(httpx.get(f"{url}/health").text)["busy"] == 0
