"""Dynamic batching: concurrent requests queue here; one worker thread per model replica takes them in batches.

Why our own queue rather than LitServe's (README "Serve" has the whole story): LitServe runs each endpoint's
model in spawned worker processes, so /v1/segment, /v1/chat and the page's refine would each hold a model copy
per device, and switching the served model (`POST /v1/model`) or keeping refine's [SEG] embedding would have
to cross process boundaries. Here every front door reaches the same `Predictor` objects in this process.

Requests reach the queue already encoded: the service's preparation pool decodes each image and runs the
processor (tiles, SAM-2 resize, tokens) on its threads, so under load the queue fills while the GPU works and a
worker's batch costs only collating and the model. The queue knows how many tasks are still being prepared
(`announce` / `submit` / `withdraw`): a worker takes the oldest task and waits for more only while some are on
their way, at most `timeout_s` from that task's arrival, up to `max_batch_size`. An idle server therefore
runs a lone request at once, without waiting out the timeout, and a busy one gathers full batches.
The model releases the GIL in its kernels, so the event loop and the pool keep working meanwhile.

Each replica has two threads: a stager that takes the next batch and collates it (stacks its images into
page-locked memory) while the worker runs the current one on the model, so the GPU does not wait for that host
work between batches. While its worker is busy a stager is in no hurry: it lets idle replicas take first and
waits for every request still being prepared (not just the timeout), so staging ahead never makes batches
smaller than they would have been.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vseg.inference.engine import ItemPrediction
from vseg.inference.inputs import collate
from vseg.inference.predictor import Predictor
from vseg.serve.prepare import encode as encode_sample


@dataclass
class Task:
    """One image of one request, waiting for a worker."""

    kind: str  # "segment" (batched) | "refine" (alone: the decoder pass reuses a cached [SEG] embedding)
    mode: str  # answer mode: teacher_forced | generate
    image: np.ndarray  # HxWx3 uint8
    prompt: str
    points: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)
    sample: dict[str, Any] | None = None  # the processor's features (`Predictor.dataset(...)[0]`), if prepared
    encoded_by: Any = None  # the processor that made `sample` (a model switch since then: encoded again)
    prepare_ms: float = 0.0  # decoding + encoding in the preparation pool
    probability: bool = True  # the foreground probability map is needed (probability PNG, another threshold)

    def batchable_with(self, other: Task) -> bool:
        return self.kind == other.kind == "segment" and self.mode == other.mode


@dataclass
class Outcome:
    """A task's prediction and where its time went."""

    prediction: ItemPrediction
    queue_ms: float  # from arrival in the queue to its batch starting on the worker (staged time included)
    model_ms: float  # the batch's call on the worker (collating too, unless the stager did it ahead)
    batch_size: int  # images in that call
    replica: str
    prepare_ms: float = 0.0  # decoding + encoding before the queue
    # the batch's call in parts: collate_ms (on the stager, or the worker's own), copy_ms (to the device),
    # forward_ms, finish_ms (masks back)
    parts: dict[str, float] = field(default_factory=dict)


class Batcher:
    """A thread-safe task queue that hands out batches of compatible tasks."""

    def __init__(self, max_batch_size: int, timeout_s: float):
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self._tasks: deque[Task] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._coming = 0  # tasks announced and still being prepared
        self._takers: list[Callable[[], bool]] = []  # the `busy` test of each thread inside `take`

    def announce(self, n: int = 1) -> None:
        """`n` tasks are being prepared and will be submitted (or withdrawn): workers may wait for them."""
        with self._cond:
            self._coming += n

    def withdraw(self, n: int = 1) -> None:
        """Announced tasks that will not come (their preparation failed)."""
        with self._cond:
            self._coming = max(0, self._coming - n)
            self._cond.notify_all()

    def submit(self, task: Task, announced: bool = False) -> Future:
        with self._cond:
            if announced:
                self._coming = max(0, self._coming - 1)
            if self._closed:
                raise RuntimeError("the service is shutting down")
            task.enqueued = time.perf_counter()
            self._tasks.append(task)
            self._cond.notify_all()
        return task.future

    def __len__(self) -> int:
        return len(self._tasks)

    @property
    def coming(self) -> int:
        return self._coming

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wake(self) -> None:
        """Makes waiting takers look again (a worker finished its batch: its stager need not wait any more)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, busy: Callable[[], bool] | None = None) -> list[Task] | None:
        """The next batch (blocks); None once closed.

        `busy()` true: the caller's worker is still running a batch (a stager taking ahead). Then there is no
        hurry: takers of idle workers go first, and once this one holds a task it waits for every task still on
        its way (up to `max_batch_size`) instead of the timeout, until its worker is free (`wake` re-checks).
        """
        busy = busy or (lambda: False)
        with self._cond:
            self._takers.append(busy)
            try:
                while not self._closed and (not self._tasks or (busy() and self._idle_taker(busy))):
                    self._cond.wait()
                if self._closed:
                    return None
                return self._gather(self._tasks.popleft(), busy)
            finally:
                self._takers.remove(busy)

    def _idle_taker(self, mine: Callable[[], bool]) -> bool:
        return any(not busy() for busy in self._takers if busy is not mine)

    def _gather(self, first: Task, busy: Callable[[], bool]) -> list[Task]:
        """`first` and the compatible tasks queued or on their way (called with the lock held)."""
        batch = [first]
        if first.kind != "segment":
            return batch
        deadline = first.enqueued + self.timeout_s
        while len(batch) < self.max_batch_size:
            for task in list(self._tasks):  # compatible tasks, oldest first; others keep their place
                if len(batch) >= self.max_batch_size:
                    break
                if first.batchable_with(task):
                    self._tasks.remove(task)
                    batch.append(task)
            # wait only for tasks on their way; an idle server runs what it has at once
            if len(batch) >= self.max_batch_size or self._closed or self._coming == 0:
                break
            if busy():
                self._cond.wait()  # woken by a submit, a withdraw or the worker finishing (`wake`)
                continue
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)
        return batch


@dataclass
class Staged:
    """A batch taken from the queue, collated by the stager for the predictor that was serving then."""

    tasks: list[Task]
    predictor: Predictor | None = None
    collated: dict[str, Any] | None = None  # None: refine, or collating failed (the worker sorts it out per task)
    collate_ms: float = 0.0


class Replica:
    """One `Predictor` (one device, or one `device_map` split), its stager and the worker thread that runs it."""

    def __init__(self, name: str, placement: dict[str, Any], batcher: Batcher):
        self.name, self.placement, self.batcher = name, placement, batcher
        self.predictor: Predictor | None = None
        self.lock = threading.Lock()  # held while the model runs; a model switch takes it to swap predictors
        self.batches = 0
        self.images = 0
        self.busy = False  # the worker is running a batch
        # batch sizes the model was warmed up for with CUDA graphs: a batch is padded up to the next one (its last
        # sample repeated, the extra rows' predictions dropped); empty = batches run at their own size
        self.pad_sizes: list[int] = []
        self._threads: list[threading.Thread] = []
        self._inbox = threading.Condition()  # guards the worker's inputs: `_calls`, `_staged`, `_closed`
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the worker thread before batches
        self._staged: Staged | None = None
        self._closed = False

    def start(self, on_error: Callable[[BaseException], None]) -> None:
        self._threads = [
            threading.Thread(target=self._loop, args=(on_error,), name=f"vseg-{self.name}", daemon=True),
            threading.Thread(target=self._stage_loop, name=f"vseg-{self.name}-stager", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on this replica's worker thread, between batches (warm-up: torch.compile's CUDA-graph trees
        belong to the thread that records them, so the graphs must be recorded where the model will run)."""
        future: Future = Future()
        if not self._threads or not self._threads[0].is_alive():
            future.set_exception(RuntimeError(f"{self.name}: its worker thread is not running"))
            return future
        with self._inbox:
            self._calls.append((fn, future))
            self._inbox.notify_all()
        return future

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as err:  # the caller gets it; the worker goes on
                future.set_exception(err)

    def _stage_loop(self) -> None:
        """Takes the next batch and collates it while the worker runs the current one (one batch ahead)."""
        while True:
            with self._inbox:
                while self._staged is not None and not self._closed:
                    self._inbox.wait()
                if self._closed:
                    return
            tasks = self.batcher.take(lambda: self.busy)
            staged = None if tasks is None else self._collate(tasks)
            with self._inbox:
                self._staged, self._closed = staged, staged is None
                self._inbox.notify_all()

    def _collate(self, tasks: list[Task]) -> Staged:
        staged = Staged(tasks, self.predictor)
        if tasks[0].kind != "segment" or staged.predictor is None:
            return staged
        start = time.perf_counter()
        try:
            staged.collated = self._collated(staged.predictor, tasks, self.pad_sizes)
        except Exception:  # noqa: BLE001 - the worker runs the tasks one by one, so each gets its own error
            staged.collated = None
        staged.collate_ms = 1000 * (time.perf_counter() - start)
        return staged

    def _loop(self, on_error: Callable[[BaseException], None]) -> None:
        while True:
            with self._inbox:
                while not self._calls and self._staged is None and not self._closed:
                    self._inbox.wait()
                staged = None
                if not self._calls:
                    if self._staged is None:
                        return  # closed, nothing left
                    staged, self._staged, self.busy = self._staged, None, True
                    self._inbox.notify_all()  # the stager takes the next batch meanwhile
            if staged is None:
                self._run_calls()
                continue
            try:
                self._run(staged)
            except BaseException as err:  # never lose the worker: each task gets the error, the loop goes on
                for task in staged.tasks:
                    if not task.future.done():
                        task.future.set_exception(err)
                on_error(err)
            finally:
                self.busy = False
                self.batcher.wake()  # a stager waiting for a fuller batch takes what it has now

    def _run(self, staged: Staged) -> None:
        batch = staged.tasks
        start = time.perf_counter()
        with self.lock:
            predictor = self.predictor
            assert predictor is not None, "a worker runs only after its model is loaded"
            parts: dict[str, float] = {}
            if batch[0].kind == "refine":
                t = batch[0]
                results: list[Any] = [predictor.refine(t.image, t.prompt, t.points, t.labels)]
            else:
                # collated for the predictor serving now (not one switched away from since)
                ready = staged.collated if staged.predictor is predictor else None
                if ready is not None:
                    parts["collate_ms"] = staged.collate_ms  # off the worker: done while the last batch ran
                results = self._predict(predictor, batch, parts, ready, self.pad_sizes)
        model_ms = 1000 * (time.perf_counter() - start)
        self.batches += 1
        self.images += len(batch)
        for task, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                task.future.set_exception(result)
            else:
                queue_ms = 1000 * (start - task.enqueued)
                outcome = Outcome(result, queue_ms, model_ms, len(batch), self.name, task.prepare_ms, parts)
                task.future.set_result(outcome)

    @staticmethod
    def _samples(predictor: Predictor, batch: list[Task]) -> list[dict[str, Any]]:
        """Each task's encoded features; tasks encoded by another model's processor (a switch) are encoded again."""
        for t in batch:
            if t.sample is None or t.encoded_by is not predictor.processor:
                t.sample, t.encoded_by = encode(predictor, t), predictor.processor
        return [t.sample for t in batch]  # type: ignore[misc]

    @classmethod
    def _collated(cls, predictor: Predictor, tasks: list[Task], pad_sizes: Sequence[int] = ()) -> dict[str, Any]:
        """The tasks' batch, padded to the smallest of `pad_sizes` that holds it (none: as it is)."""
        samples = cls._samples(predictor, tasks)
        size = min((n for n in pad_sizes if n >= len(samples)), default=len(samples))
        samples += [samples[-1]] * (size - len(samples))
        # a CUDA model: images stacked into cached page-locked memory (no page faults per batch, fast copy)
        pin = predictor.device is not None and predictor.device.type == "cuda"
        return collate(predictor.processor, samples, pin)

    @classmethod
    def _predict(
        cls,
        predictor: Predictor,
        batch: list[Task],
        parts: dict[str, float] | None = None,
        collated: dict[str, Any] | None = None,
        pad_sizes: Sequence[int] = (),
    ) -> list[ItemPrediction | BaseException]:
        """One model call for the batch; if it fails, each task alone, so one bad input fails only itself.

        The same steps as `Predictor.predict` (the processor's features, `collate`, the predictor on the batch),
        so a served mask is the mask predict.py writes for the image. The probability maps are computed only
        when a task of the batch needs them. `parts` gets where the call's time went (`Outcome.parts`);
        `collated`: the batch already collated (by the stager); `pad_sizes`: see `Replica.pad_sizes`.
        """
        mode = batch[0].mode
        parts = {} if parts is None else parts

        def run(tasks: list[Task], ready: dict[str, Any] | None = None) -> list[Any]:
            if ready is None:
                start = time.perf_counter()
                ready = cls._collated(predictor, tasks, pad_sizes)
                parts["collate_ms"] = 1000 * (time.perf_counter() - start)
            return list(predictor(ready, mode, any(t.probability for t in tasks), parts))[: len(tasks)]

        try:
            return run(batch, collated)
        except Exception:
            if len(batch) == 1:
                raise
        out: list[ItemPrediction | BaseException] = []
        for t in batch:
            try:
                out.append(run([t])[0])
            except Exception as err:
                out.append(err)
        return out


def encode(predictor: Predictor, task: Task) -> dict[str, Any]:
    """The processor's features of a segment task, as `Predictor.predict` makes them (ValueError if unusable)."""
    answer = predictor.answer_text if task.mode == "teacher_forced" else None
    return encode_sample(predictor.processor, task.image, task.prompt, answer)
