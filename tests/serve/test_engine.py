from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from sparseft import runtime
from sparseft.errors import SparseftError
from sparseft.hf import load_tokenizer
from sparseft.runtime.generate import end_ids
from sparseft.serve.engine import Closed, Engine, Job, QueueFull, Sampling

PROMPTS = ["def foo(x):", "import os\nimport sys\n\nclass Reader:\n    def read(self):", "x = 1", "for i in"]


@pytest.fixture(scope="module")
def net(model_dir: Path) -> Any:
    return runtime.load(model_dir, decoder="sparseft")


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Any:
    return load_tokenizer(str(model_dir))


def wait(jobs: list[Job], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while any(j.finish is None for j in jobs):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.005)


def run(engine: Engine, jobs: list[Job]) -> list[Job]:
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        wait(jobs)
    finally:
        engine.stop()
    return jobs


def greedy(tok: Any, prompt: str, new: int = 24, **options: Any) -> Job:
    return Job(tok(prompt).input_ids, new, Sampling(temperature=0), **options)


def test_batched_greedy_requests_equal_each_alone_and_generate(net: Any, tok: Any) -> None:
    # two slots for four requests: they queue, join the batch as others leave, and prefill in chunks of 4
    batched = run(Engine(net, tok, max_batch=2, prefill_chunk=4), [greedy(tok, p) for p in PROMPTS])
    for prompt, job in zip(PROMPTS, batched, strict=True):
        (alone,) = run(Engine(net, tok, max_batch=1), [greedy(tok, prompt)])
        assert job.tokens == alone.tokens
        ids = torch.tensor([job.prompt])
        expected = net.generate(ids, max_new_tokens=24)[0, ids.shape[1] :].tolist()
        assert job.tokens == expected[: len(job.tokens)]
        assert job.finish == ("stop" if job.tokens[-1] in end_ids(net, None) else "length")


def test_events_carry_the_text_and_end_with_the_finish_reason(net: Any, tok: Any) -> None:
    events: list[tuple[str, str | None, str | None]] = []
    job = greedy(tok, PROMPTS[0], on_event=lambda *e: events.append(e))
    run(Engine(net, tok), [job])
    assert [e[1] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1][1] == job.finish in ("stop", "length")
    text = job.tokens[:-1] if job.finish == "stop" else job.tokens  # an end token is not part of the text
    assert "".join(e[0] for e in events) == tok.decode(text, skip_special_tokens=True)


def test_a_stop_string_ends_the_text_before_it(net: Any, tok: Any) -> None:
    (free,) = run(Engine(net, tok), [greedy(tok, PROMPTS[1], new=24)])
    text = tok.decode(free.tokens, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    events: list[Any] = []
    job = greedy(tok, PROMPTS[1], new=24, stop=[stop], on_event=lambda *e: events.append(e))
    run(Engine(net, tok), [job])
    sent = "".join(e[0] for e in events)
    assert job.finish == "stop" and stop not in sent
    assert sent == text[: text.index(stop)]


def test_a_seed_makes_sampling_repeat_alone_or_batched(net: Any, tok: Any) -> None:
    def sampled(seed: int) -> Job:
        return Job(tok(PROMPTS[0]).input_ids, 16, Sampling(temperature=1.5, top_k=50, seed=seed))

    first, second, other = run(Engine(net, tok), [sampled(1), sampled(1), sampled(2)])
    (alone,) = run(Engine(net, tok), [sampled(1)])
    assert first.tokens == second.tokens == alone.tokens
    assert other.tokens != first.tokens


def test_the_context_bounds_prompt_and_completion(net: Any, tok: Any) -> None:
    engine = Engine(net, tok, context=12)
    with pytest.raises(SparseftError, match="context is 12 tokens"):
        engine.submit(Job(list(range(3, 15)), 4))
    (job,) = run(engine, [Job(list(range(3, 10)), 100, Sampling(temperature=0))])
    assert job.finish in ("length", "stop") and len(job.prompt) + len(job.tokens) <= 12


class Gate:
    """The model, held before each forward until `open` is set: the test decides when the engine moves."""

    def __init__(self, net: Any) -> None:
        self.net, self.open, self.calls = net, threading.Event(), 0
        self.config, self.generation_config = net.config, net.generation_config

    def new_slots(self, *args: Any) -> Any:
        return self.net.new_slots(*args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        assert self.open.wait(30)
        self.calls += 1
        return self.net(*args, **kwargs)


def test_a_full_queue_refuses_and_a_closing_engine_takes_nothing(net: Any, tok: Any) -> None:
    engine = Engine(Gate(net), tok, max_batch=1, max_queue=1)
    engine.submit(greedy(tok, "a"))  # takes the free slot at the next turn
    engine.submit(greedy(tok, "b"))  # waits in the queue
    with pytest.raises(QueueFull):
        engine.submit(greedy(tok, "c"))
    engine.drain()
    with pytest.raises(Closed):
        engine.submit(greedy(tok, "d"))


def test_a_cancelled_job_leaves_and_frees_its_slot(net: Any, tok: Any) -> None:
    gate = Gate(net)
    engine = Engine(gate, tok, max_batch=1).start()
    try:
        first = Job(tok("x").input_ids, 10_000, Sampling(temperature=0))
        engine.submit(first)
        gate.open.set()
        while len(first.tokens) < 3:
            time.sleep(0.001)
        engine.cancel(first)
        second = greedy(tok, "y", new=3)
        engine.submit(second)
        wait([first, second])
        assert first.finish == "abort" and second.finish in ("stop", "length")
        assert engine.busy == 0
    finally:
        engine.stop()


def test_a_failing_step_ends_its_jobs_with_the_error_and_the_engine_goes_on(net: Any, tok: Any) -> None:
    class Failing(Gate):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("boom")
            return self.net(*args, **kwargs)

    events: list[Any] = []
    broken = greedy(tok, "x", on_event=lambda *e: events.append(e))
    after = greedy(tok, "y", new=3)
    engine = Engine(Failing(net), tok, max_batch=1)
    run(engine, [broken, after])
    assert broken.finish == "error" and events[-1][2] == "RuntimeError: boom"
    assert after.finish in ("stop", "length")


def test_settings_are_checked(net: Any, tok: Any) -> None:
    with pytest.raises(SparseftError, match="max_batch"):
        Engine(net, tok, max_batch=0)
    with pytest.raises(SparseftError, match="no tokens"):
        Engine(net, tok).submit(Job([], 4))
