"""Admission, batching and cancellation for the HTTP server: asyncio over the runtime's threads.

    request --admit--> at most max_concurrency running + max_queue waiting; beyond that, refused
                       at once (``Overloaded`` -> 429); while draining, refused (``Draining`` -> 503)
    score   ---------> joins the pending list; max_concurrency worker loops each take, when a
                       slot is free, the oldest pending jobs up to max_batch sequences and score
                       them in one batched call: requests that arrive while the slots are busy
                       share the next call (max_batch 1 turns batching off)
    generate --------> holds a slot for its whole length, one onnxruntime step per executor call
    run / stream ----> any other work (sessions, completions) in a slot of its kind

Scoring and generation are admitted separately: each kind has its own max_concurrency slots, its
own worker threads and its own max_queue places, so long generations (or long prompts, which hold
a generation slot) cannot starve scoring, and a flood of scoring cannot starve generation.

No recurrent state is shared: every sequence of every request starts from a fresh state, and a
batch keeps its sequences in separate columns. onnxruntime runs in worker threads, so the event
loop keeps answering health checks and metrics while a batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from rnnlm.serve.runtime import LanguageModel, ScoreResult

from rnnlm.text import Token

log = logging.getLogger("rnnlm.serve")


class Overloaded(Exception):
    """Every slot and every queue place is taken."""


class Draining(Exception):
    """The server is shutting down (or not ready): it takes no new work."""


@dataclass
class _ScoreJob:
    sequences: Sequence[Sequence[Token]]
    per_token: bool
    future: asyncio.Future[list[ScoreResult]]
    cancelled: threading.Event = field(default_factory=threading.Event)


KINDS = ("score", "generate")  # admitted separately, each with its own slots, threads and queue


@dataclass
class Stats:
    """What /metrics reads; updated on the event loop only."""

    admitted: int = 0  # running or waiting, all kinds
    running: int = 0  # holding a slot, all kinds
    on_batch: Callable[[int], None] | None = None  # told the number of sequences of each batched call
    admitted_by_kind: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    @property
    def queued(self) -> int:
        return self.admitted - self.running


class Scheduler:
    def __init__(self, lm: LanguageModel, *, max_concurrency: int = 2, max_queue: int = 64, max_batch: int = 32) -> None:
        if max_concurrency < 1 or max_queue < 0 or max_batch < 1:
            raise ValueError("max_concurrency and max_batch must be >= 1, max_queue >= 0")
        self.lm = lm
        self.max_concurrency, self.max_queue, self.max_batch = max_concurrency, max_queue, max_batch
        self.stats = Stats()
        self.draining = False
        self._pools = {kind: ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix=f"rnnlm-{kind}")
                       for kind in KINDS}
        self._slots = {kind: asyncio.Semaphore(max_concurrency) for kind in KINDS}
        self._pending: list[_ScoreJob] = []
        self._wake = asyncio.Event()  # set when a job is added
        self._workers: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for job in self._pending:
            job.cancelled.set()
        # Not wait=True: this runs on the event loop. A batch still running stops at its next chunk
        # (its jobs are cancelled) and the interpreter joins the thread at exit.
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ admission
    @contextlib.contextmanager
    def admit(self, kind: str = "score") -> Iterator[None]:
        """Count a request of ``kind`` ("score" or "generate") in, or refuse it at once: never an
        unbounded wait. Each kind has max_concurrency + max_queue places of its own."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.stats.admitted_by_kind[kind] >= self.max_concurrency + self.max_queue:
            raise Overloaded(f"busy: {self.max_concurrency} {kind} requests running and {self.max_queue} waiting")
        self.stats.admitted += 1
        self.stats.admitted_by_kind[kind] += 1
        try:
            yield
        finally:
            self.stats.admitted -= 1
            self.stats.admitted_by_kind[kind] -= 1

    async def _acquire(self, kind: str) -> None:
        await self._slots[kind].acquire()
        self.stats.running += 1

    def _release(self, kind: str) -> None:
        self.stats.running -= 1
        self._slots[kind].release()

    def _release_when_done(self, kind: str, work: asyncio.Future[Any] | None) -> None:
        """A slot is free when its thread is, not when its awaiting request gives up."""
        if work is None or work.done():
            self._release(kind)
        else:
            work.add_done_callback(lambda _: self._release(kind))

    async def run(self, kind: str, fn: Callable[[Callable[[], bool]], Any]) -> Any:
        """``fn(cancelled)`` in a worker thread of ``kind``, holding one of its slots: what a session
        call or a completion does. Cancelling the awaiting task makes ``cancelled()`` return True,
        which the runtime polls between onnxruntime calls."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        await self._acquire(kind)
        work: asyncio.Future[Any] | None = None
        try:
            work = loop.run_in_executor(self._pools[kind], fn, stop.is_set)
            return await asyncio.shield(work)
        finally:
            stop.set()
            self._release_when_done(kind, work)

    # ------------------------------------------------------------------ scoring
    async def score(self, sequences: Sequence[Sequence[Token]], *, per_token: bool = False) -> list[ScoreResult]:
        """Score independent sequences (each from a fresh state), batched with whatever other
        requests are waiting. Cancelling the awaiting task drops the job, or stops its batch
        between chunks when every job in it has been dropped."""
        loop = asyncio.get_running_loop()
        job = _ScoreJob(sequences, per_token, loop.create_future())
        self._pending.append(job)
        self._start_workers(loop)
        self._wake.set()
        try:
            return await job.future
        finally:
            job.cancelled.set()
            if job in self._pending:
                self._pending.remove(job)

    def _start_workers(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._workers:
            self._workers = [loop.create_task(self._score_worker()) for _ in range(self.max_concurrency)]

    async def _score_worker(self) -> None:
        """One of max_concurrency loops: whenever jobs are pending and a slot is free, score all
        the pending jobs that fit in one batch. Jobs pile up while the slots are busy, so batches
        grow with the load and a lone request still runs at once."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            await self._acquire("score")
            work: asyncio.Future[None] | None = None
            try:
                batch = self._take_batch()
                if batch:
                    work = loop.run_in_executor(self._pools["score"], self._run_batch, batch, loop)
                    await asyncio.shield(work)
            except Exception:  # _run_batch hands its own errors to the requests; anything else, log and go on
                log.exception("the scoring worker caught an error")
            finally:
                self._release_when_done("score", work)

    def _take_batch(self) -> list[_ScoreJob]:
        """The oldest pending jobs, up to max_batch sequences (one job may exceed it alone)."""
        batch: list[_ScoreJob] = []
        n = 0
        while self._pending and (not batch or n + len(self._pending[0].sequences) <= self.max_batch):
            job = self._pending.pop(0)
            if job.cancelled.is_set() or job.future.done():
                continue
            batch.append(job)
            n += len(job.sequences)
        if batch and self.stats.on_batch is not None:
            self.stats.on_batch(n)
        return batch

    def _run_batch(self, batch: list[_ScoreJob], loop: asyncio.AbstractEventLoop) -> None:
        """In a worker thread: one call over every sequence of every job, results handed back.
        Whatever fails is handed to the batch's requests (raised there), never to the worker."""
        try:
            sequences = [seq for job in batch for seq in job.sequences]
            logprobs = self.lm.sequence_logprobs(
                [[t.id for t in seq] for seq in sequences], batch_size=self.max_batch,
                cancelled=lambda: all(job.cancelled.is_set() for job in batch))
            start, results = 0, []
            for job in batch:
                n = len(job.sequences)
                results.append([self.lm.result_of(seq, lp, per_token=job.per_token)
                                for seq, lp in zip(job.sequences, logprobs[start : start + n], strict=True)])
                start += n
        except BaseException as e:
            for job in batch:
                loop.call_soon_threadsafe(_settle, job.future, None, e)
            return
        for job, result in zip(batch, results, strict=True):
            loop.call_soon_threadsafe(_settle, job.future, result, None)

    # ------------------------------------------------------------------ generation
    def generate(self, prompt: str, **kwargs: Any) -> AsyncIterator[np.ndarray]:
        """The runtime's generate_ids in a generation slot (see ``stream``). Check the arguments
        first (``lm.check_generate``)."""
        return self.stream("generate", lambda cancelled: self.lm.generate_ids(prompt, **kwargs, cancelled=cancelled))

    async def stream(self, kind: str, make: Callable[[Callable[[], bool]], Iterator[Any]]) -> AsyncIterator[Any]:
        """The items of ``make(cancelled)``, produced by one worker thread of ``kind`` that holds a
        slot throughout and hands each item to the event loop as it comes (one thread handoff per
        request, not per item). Closing this iterator stops the thread at its next item or at the
        runtime's next onnxruntime call (``cancelled`` turns True)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            def hand(item: Any) -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed under us: nobody is waiting
                    loop.call_soon_threadsafe(queue.put_nowait, item)

            try:
                items = make(stop.is_set)  # stops a long prompt too
                try:
                    for item in items:
                        if stop.is_set():
                            break
                        hand(item)
                finally:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()
            except BaseException as e:
                hand(e)
            finally:
                hand(_END)

        await self._acquire(kind)
        work: asyncio.Future[None] | None = None
        try:
            work = loop.run_in_executor(self._pools[kind], produce)
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            self._release_when_done(kind, work)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_END = object()  # the end of a generation, on its queue
