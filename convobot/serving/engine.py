"""Continuous batching: one thread per served base model runs every request's sequences together.

A request joins the running batch at the next step and leaves it when it finishes; its prompt is prefilled a chunk
per step, so a long prompt does not stall the sequences already decoding for more than a chunk's time. Each step
the runner (PyTorch: torch_runner.py; llama.cpp: llama_runner.py) computes the next logits of every running
sequence in one pass, and each sequence picks its token with its own settings and generator (sampling.py).
Requests beyond the free rows wait in a queue, bounded by `max_queued`; past it a request is refused at once.

A request's events reach its reader through `emit` (the server hands a thread-safe callback into its event loop):

    Delta(choice, text, logprobs, finish_reason)   text ready to send, None until the choice's last delta
    Done(prompt_tokens, completion_tokens)          after every choice has finished
    Failed(message)                                 the engine could not answer (the request is dropped)
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from convobot.serving.sampling import Detokenizer, SamplingParams, TokenLogprob, generator_for, logprob_of, next_token

log = logging.getLogger(__name__)


@dataclass
class Delta:
    choice: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


class QueueFull(Exception):
    """More requests are waiting than the engine queues (max_queued)."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[object], None]
    adapter: str  # an adapter's name, or the runner's name for the base model
    n: int = 1
    cancelled: bool = False
    completion_tokens: int = 0  # sampled by all choices, EOS included

    def cancel(self) -> None:
        """The reader has gone: the engine frees the request's rows at its next step."""
        self.cancelled = True


@dataclass(eq=False)
class Choice:
    """One sequence of a request: what it generated and what of it was sent."""
    request: Request
    index: int
    detokenizer: Detokenizer
    generator: torch.Generator | None
    history: torch.Tensor  # prompt and generated ids, for the repetition penalty
    logprobs: list[TokenLogprob] = field(default_factory=list)
    sent_text: int = 0
    sent_tokens: int = 0
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.detokenizer.ids


class Engine:
    """The scheduler of one runner: admission, chunked prefill, decode steps, finishing, adapter changes."""

    def __init__(self, runner, tokenizer, name: str, max_queued: int = 64, prefill_chunk: int = 256):
        self.runner, self.tokenizer, self.name = runner, tokenizer, name
        self.max_queued, self.prefill_chunk = max_queued, prefill_chunk
        self.eos = tokenizer.eos_token_id
        self.waiting: deque[Request] = deque()
        self.prefilling: list[tuple[Request, object]] = []
        self.running: list[Choice] = []
        self.commands: deque[tuple[Callable, Future]] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)

    def start(self) -> Engine:
        self.thread.start()
        return self

    # ----------------------------------------------------------------- called from the server's threads

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull if no row is free for it and `max_queued` requests wait for rows already."""
        with self.wake:
            # Requests just submitted sit in `waiting` until the loop's next step, rows free or not: count as queued
            # only those the free rows cannot take.
            rows, queued = self.runner.free - sum(r.n for r, _ in self.prefilling), 0
            for waiting in self.waiting:
                if waiting.n <= rows:
                    rows -= waiting.n
                else:
                    queued += 1
            if request.n > rows and queued >= self.max_queued:
                raise QueueFull(f"every row of {self.name} is busy and {queued} requests are waiting (max_queued)")
            self.waiting.append(request)
            self.wake.notify()

    def call(self, work: Callable):
        """Run `work` in the engine's thread between two steps (loading or dropping an adapter) and return its
        result; nothing else touches the model meanwhile."""
        done: Future = Future()
        with self.wake:
            self.commands.append((work, done))
            self.wake.notify()
        return done.result()

    def busy_with(self, adapter: str) -> int:
        """Requests for `adapter` waiting or running."""
        with self.wake:
            return (sum(r.adapter == adapter for r in self.waiting)
                    + sum(r.adapter == adapter for r, _ in self.prefilling)
                    + len({id(c.request) for c in self.running if c.request.adapter == adapter}))

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def stop(self) -> None:
        """Finish what is running and waiting, then end the thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    # ----------------------------------------------------------------- the engine's thread

    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.commands or self.waiting or self.prefilling or self.running or self.stopping):
                    self.wake.wait()
                if self.stopping and not (self.commands or self.waiting or self.prefilling or self.running):
                    return
                commands = list(self.commands)
                self.commands.clear()
                self._admit()
            for work, done in commands:
                try:
                    done.set_result(work())
                except Exception as err:  # reported to the caller; the engine goes on
                    done.set_exception(err)
            try:
                self._step()
            except Exception as err:
                log.exception("%s: a step failed", self.name)
                self._fail_all(f"the model failed: {err}")

    def _admit(self) -> None:
        """Start prefilling waiting requests while their choices fit in free rows."""
        reserved = sum(request.n for request, _ in self.prefilling)
        while self.waiting and self.waiting[0].n <= self.runner.free - reserved:
            request = self.waiting.popleft()
            if request.cancelled:
                continue
            self.prefilling.append((request, self.runner.new_prefill(request.prompt_ids, request.adapter)))
            reserved += request.n

    def _step(self) -> None:
        self._drop_cancelled()
        if self.prefilling:  # one chunk of the oldest prompt per step
            request, job = self.prefilling[0]
            self.runner.prefill(job, self.prefill_chunk)
            if job.finished:
                self.prefilling.pop(0)
                self._start_choices(request, job)
        if self.running:
            logits = self.runner.decode({choice: choice.generated[-1] for choice in self.running})
            for choice in list(self.running):
                self._advance(choice, logits[choice])

    def _start_choices(self, request: Request, job) -> None:
        history = torch.tensor(request.prompt_ids, dtype=torch.long)
        for index in range(request.n):
            choice = Choice(request, index, Detokenizer(self.tokenizer, request.params.stop),
                            generator_for(request.params.seed, index), history)
            if self._advance(choice, job.logits, joining=True):
                self.runner.join(choice, job)
                self.running.append(choice)
        self.runner.forget(job)
        self._maybe_done(request)

    def _advance(self, choice: Choice, logits: torch.Tensor, joining: bool = False) -> bool:
        """Pick and record the choice's next token, send what became ready; False once it has finished."""
        params = choice.request.params
        token = next_token(logits, choice.history, params, choice.generator)
        choice.request.completion_tokens += 1
        if params.logprobs:
            choice.logprobs.append(logprob_of(logits, token, params.top_logprobs))
        length = len(choice.request.prompt_ids) + len(choice.generated) + 1
        if token == self.eos and not params.ignore_eos:
            choice.finish_reason = "stop"
        else:
            choice.detokenizer.add(token)
            choice.history = torch.cat([choice.history, torch.tensor([token])])
            if choice.detokenizer.stopped:
                choice.finish_reason = "stop"
            elif len(choice.generated) >= params.max_tokens or length >= self.runner.context:
                choice.finish_reason = "length"
        if choice.finish_reason == "stop" and token == self.eos and params.logprobs:  # EOS is no text: not sent
            choice.logprobs.pop()
        self._send(choice)
        if choice.finish_reason is None:
            return True
        if not joining:
            self.running.remove(choice)
            self.runner.leave(choice)
            self._maybe_done(choice.request)
        return False

    def _send(self, choice: Choice) -> None:
        ready = choice.detokenizer.text if choice.finish_reason else choice.detokenizer.ready
        shown = min(choice.detokenizer.tokens_within(len(ready)), len(choice.logprobs))
        if len(ready) > choice.sent_text or choice.finish_reason:
            choice.request.emit(Delta(choice.index, ready[choice.sent_text:],
                                      choice.logprobs[choice.sent_tokens:shown], choice.finish_reason))
            choice.sent_text, choice.sent_tokens = len(ready), max(shown, choice.sent_tokens)

    def _maybe_done(self, request: Request) -> None:
        if any(c.request is request for c in self.running):
            return
        request.emit(Done(len(request.prompt_ids), request.completion_tokens))

    def _drop_cancelled(self) -> None:
        for choice in [c for c in self.running if c.request.cancelled]:
            self.running.remove(choice)
            self.runner.leave(choice)
        for request, job in [(r, j) for r, j in self.prefilling if r.cancelled]:
            self.prefilling.remove((request, job))
            self.runner.forget(job)

    def _fail_all(self, message: str) -> None:
        requests = {id(c.request): c.request for c in self.running} | {id(r): r for r, _ in self.prefilling}
        for choice in list(self.running):
            self.runner.leave(choice)
        for _, job in self.prefilling:
            self.runner.forget(job)
        self.running.clear()
        self.prefilling.clear()
        for request in requests.values():
            request.emit(Failed(message))
