"""Continuous batching on the runtime's own decoder: requests join the running batch between steps and leave when
done, one thread runs the model, and HTTP (or any caller) only submits jobs and reads their events.

Each loop turn admits waiting jobs into free cache slots, prefills one chunk of one new prompt, then takes one
decoding step for every running job at once. Decoding reads every weight once per step whatever the batch, so
the batch's tokens cost little more than one's; a long prompt, cut into chunks, holds the others up by one chunk
at most. Every row attends over its own slot and the linears treat rows alike, so a greedy request gives the
same text alone or in a batch.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sparseft.errors import SparseftError
from sparseft.runtime.generate import choose, end_ids
from sparseft.serve.metrics import Metrics
from sparseft.serve.text import TextTail


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already; the caller should try again later."""


class Closed(Exception):
    """The engine is shutting down and takes no new jobs."""


@dataclass
class Sampling:
    """How a job picks its tokens: greedy at temperature 0, else sampled (top-k 0 and top-p 1 are off)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# what a job's events carry: new text, then on the last event the reason it ended ("stop", "length",
# "abort", "error") with the error message, if any
Event = Callable[[str, "str | None", "str | None"], None]


@dataclass(eq=False)
class Job:
    """One request: its prompt's tokens, budget and sampling. `on_event(text, finish, error)` is called on the
    engine's thread for each piece of new text and once with a finish reason at the end."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: Sequence[str] = ()
    on_event: Event = lambda text, finish, error: None
    tokens: list[int] = field(default_factory=list)  # generated so far
    slot: int = -1
    prefilled: int = 0
    finish: str | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    _text: TextTail | None = None
    _generator: torch.Generator | None = None
    _pending: bool = False  # the last token is chosen but not yet fed to the model


class Engine:
    """Runs `model` (a `runtime.models.LlamaDecoder`) over up to `max_batch` requests at once, each of up to
    `context` tokens (prompt and new), with `max_queue` more waiting. `prefill_chunk`: the most prompt tokens
    one loop turn prefills."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_batch: int = 8,
        context: int = 2048,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        metrics: Metrics | None = None,
    ) -> None:
        for name, value in (("max_batch", max_batch), ("context", context), ("prefill_chunk", prefill_chunk)):
            if value < 1:
                raise SparseftError(f"{name} must be at least 1, got {value}")
        if max_queue < 0:
            raise SparseftError(f"max_queue must be 0 or more, got {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics or Metrics()
        self.cache = model.new_slots(max_batch, context)
        self.ends = end_ids(model, None)
        self._free = list(range(max_batch))[::-1]
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="sparseft-engine", daemon=True)

    # ---- the caller's side -----------------------------------------------------------------------------

    def start(self) -> Engine:
        """Start the engine's thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def submit(self, job: Job) -> None:
        """Queue `job`; raises QueueFull when the queue is full, Closed once the engine shuts down."""
        if not job.prompt:
            raise SparseftError("the prompt has no tokens")
        if len(job.prompt) >= self.context:
            raise SparseftError(
                f"the prompt has {len(job.prompt)} tokens; this server's context is {self.context} tokens "
                "(prompt and new tokens together)"
            )
        with self._wake:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_queue + len(self._free):  # free slots take theirs next turn
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(job)
            self.metrics.queue.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job` (its client went away): it leaves the batch at the next step."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def drain(self) -> None:
        """Take no new jobs; the running and waiting ones go on."""
        with self._wake:
            self._closing = True

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new jobs, end every job not yet done ("abort") and stop the thread."""
        with self._wake:
            self._closing = True
            for job in [*self._waiting, *self._running]:
                job.cancelled = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def busy(self) -> int:
        """Jobs waiting or running."""
        with self._wake:
            return len(self._waiting) + len(self._running)

    # ---- the engine's thread ---------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._waiting and not self._running and not self._closing:
                        self._wake.wait()
                    if self._closing and not self._running and not self._waiting:
                        return
                    self._admit()
                try:
                    self._turn()
                except (
                    Exception
                ) as e:  # a failing step ends its jobs with the error, the server keeps serving
                    for job in list(self._running):
                        self._end(job, "error", f"{type(e).__name__}: {e}")

    def _admit(self) -> None:
        for job in [j for j in self._waiting if j.cancelled]:
            self._waiting.remove(job)
            self._finish_unstarted(job)
        while self._waiting and self._free:
            job = self._waiting.popleft()
            job.slot = self._free.pop()
            self.cache.free(job.slot)
            job._text = TextTail(self.tokenizer, job.stop)
            if not job.sampling.greedy:
                job._generator = torch.Generator()
                job._generator.manual_seed(
                    job.sampling.seed if job.sampling.seed is not None else int(torch.seed())
                )
            self._running.append(job)
        self.metrics.queue.set(len(self._waiting))
        self.metrics.running.set(len(self._running))

    def _finish_unstarted(self, job: Job) -> None:
        job.finish = "abort"
        self.metrics.finished.labels(reason="abort").inc()
        job.on_event("", "abort", None)

    def _turn(self) -> None:
        for job in [j for j in self._running if j.cancelled]:
            self._end(job, "abort")
        prefilling = next((j for j in self._running if j.prefilled < len(j.prompt)), None)
        if prefilling is not None:
            self._prefill(prefilling)
        stepping = [j for j in self._running if j._pending]
        if stepping:
            self._step(stepping)

    def _prefill(self, job: Job) -> None:
        chunk = job.prompt[job.prefilled : job.prefilled + self.prefill_chunk]
        view = self.cache.view(job.slot)
        logits = self.model(torch.tensor([chunk]), cache=view, last_only=True).logits[:, -1]
        self.cache.keep(job.slot, view)
        job.prefilled += len(chunk)
        if job.prefilled == len(job.prompt):
            self.metrics.prompt_tokens.inc(len(job.prompt))
            self.metrics.first_token.observe(time.perf_counter() - job.submitted)
            self._take(job, logits[0])

    def _step(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        tokens = torch.tensor([[j.tokens[-1]] for j in jobs])
        logits = self.model(tokens, cache=self.cache.step([j.slot for j in jobs]), last_only=True).logits[
            :, -1
        ]
        for job, row in zip(jobs, logits, strict=True):
            job._pending = False
            self._take(job, row)
        self.metrics.batch.observe(len(jobs))
        self.metrics.step.observe(time.perf_counter() - started)

    def _take(self, job: Job, logits: torch.Tensor) -> None:
        """Choose `job`'s next token from its logits (V,) and tell its caller the new text."""
        s = job.sampling
        if s.greedy:
            token = int(logits.argmax())
        else:
            token = int(choose(logits[None], True, s.temperature, s.top_k, s.top_p, job._generator)[0])
        job.tokens.append(token)
        self.metrics.tokens.inc()
        assert job._text is not None
        if token in self.ends:
            text, _ = job._text.add(None)
            self._end(job, "stop", text=text)
            return
        text, stopped = job._text.add(token)
        if stopped:
            self._end(job, "stop", text=text)
        elif len(job.tokens) >= job.max_new_tokens or self.cache.lengths[job.slot] + 1 >= self.context:
            self._end(job, "length", text=text + job._text.rest())
        else:
            job._pending = True
            if text:
                job.on_event(text, None, None)

    def _end(self, job: Job, finish: str, error: str | None = None, text: str = "") -> None:
        job.finish = finish
        job._pending = False
        self._running.remove(job)
        self._free.append(job.slot)
        self.metrics.finished.labels(reason=finish).inc()
        self.metrics.running.set(len(self._running))
        job.on_event(text, finish, error)
