"""The one model's worker: a bounded queue of generation jobs, run one at a time in arrival order.

A single thread owns the model: it swaps a job's adapter in, streams its answer through
``moe_local.chat`` and restores the base gates, then takes the next job. The HTTP side runs on an
asyncio event loop; each job carries the loop and an ``asyncio.Queue`` that the worker fills with
``call_soon_threadsafe``, so the loop never blocks on the model and the model never waits on a client.

Events a job receives, in order: ``("text", piece)`` any number of times, then exactly one of
``("done", GenerationStats)``, ``("error", exception)`` or ``("cancelled", None)``.

Cancelling (a client gone, the server stopping) removes a waiting job from the queue at once (its slot
is free for the next request) or, for the running job, stops its generation at the next piece; the
backend's generation loop is closed, so the model is free right after.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time

from .adapters import RouterAdapters
from .prompts import Generation

log = logging.getLogger("moe_local.serve")


class QueueFull(Exception):
    """Every slot of the queue is taken."""


class ShuttingDown(Exception):
    """The server is stopping and takes no more work."""


class Job:
    """One request's generation and the channel its events travel back to the event loop on."""

    def __init__(self, generation: Generation, loop: asyncio.AbstractEventLoop):
        self.generation = generation
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self._loop = loop

    def send(self, kind: str, value=None) -> None:
        """From the worker thread: hand an event to the job's event loop (dropped once the loop is closed)."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: the server is gone and nobody reads this
            pass


class Worker:
    """The queue and the thread that runs it. ``queue_size`` counts waiting jobs, not the running one."""

    def __init__(self, model, adapters: RouterAdapters, queue_size: int):
        self.model, self.adapters, self.queue_size = model, adapters, queue_size
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._closed = False
        self._cond = threading.Condition()
        self.counts = collections.Counter(completed=0, cancelled=0, failed=0, rejected=0)
        self._seconds = None  # a running mean of how long a job takes, for Retry-After
        self._thread = threading.Thread(target=self._run_forever, name="moe-local-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.queue_size:
                self.counts["rejected"] += 1
                raise QueueFull(f"the server is busy: {len(self._waiting)} requests are waiting")
            self._waiting.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` (waiting or running); a no-op for a job that has ended."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["cancelled"] += 1
            job.cancelled.set()

    def shutdown(self) -> None:
        """Take no more jobs, tell the waiting ones so and stop the running one."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.send("error", ShuttingDown("the server is shutting down"))
            self.counts["cancelled"] += len(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.cancelled.set()
            self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the waiting jobs at the mean job time, at least 1."""
        with self._cond:
            waiting = len(self._waiting)
        return max(1, round((self._seconds or 1.0) * (waiting + 1)))

    def status(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running is not None, **self.counts}

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _run_forever(self) -> None:
        while (job := self._next()) is not None:
            start, outcome = time.perf_counter(), "failed"
            try:
                outcome = self._run(job)
            finally:
                with self._cond:
                    self._running = None
                    self.counts[outcome] += 1
            seconds = time.perf_counter() - start
            self._seconds = seconds if self._seconds is None else 0.8 * self._seconds + 0.2 * seconds

    def _run(self, job: Job) -> str:
        """Generate one job's answer, its adapter swapped in for it alone; returns how it ended."""
        g = job.generation
        if job.cancelled.is_set():  # between leaving the queue and starting
            job.send("cancelled")
            return "cancelled"
        try:
            with self.adapters.applied(g.adapter):
                conversation = self.model.chat(max_tokens=g.max_tokens, temp=g.temperature, top_p=g.top_p, seed=g.seed)
                pieces, stopped = conversation.complete(g.ids, stops=g.stops), False
                try:
                    for piece in pieces:
                        if stopped := job.cancelled.is_set():
                            break
                        job.send("text", piece)
                finally:
                    pieces.close()  # ends the backend's generation loop now
        except Exception as e:  # the request fails; the server goes on
            log.warning("request failed: %s: %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            job.send("error", e)
            return "failed"
        if stopped:  # cut short (an answer that had ended counts as completed, read or not)
            log.info("request cancelled after %d generated tokens", conversation.stats.generation_tokens)
            job.send("cancelled")
            return "cancelled"
        job.send("done", conversation.stats)
        return "completed"
