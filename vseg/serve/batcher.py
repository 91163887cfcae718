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
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
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
    queue_ms: float  # from arrival in the queue to its batch starting
    model_ms: float  # the batch's model call (collating included)
    batch_size: int  # images in that call
    replica: str
    prepare_ms: float = 0.0  # decoding + encoding before the queue
    # the batch's model call in parts: collate_ms, copy_ms (to the device), forward_ms, finish_ms (masks back)
    parts: dict[str, float] = field(default_factory=dict)


class Batcher:
    """A thread-safe task queue that hands out batches of compatible tasks."""

    def __init__(self, max_batch_size: int, timeout_s: float):
        self.max_batch_size, self.timeout_s = max_batch_size, timeout_s
        self._tasks: deque[Task] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._coming = 0  # tasks announced and still being prepared

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
        """Wakes idle workers (a replica has a call to run on its worker thread)."""
        with self._cond:
            self._cond.notify_all()

    def take(self, interrupt: Callable[[], bool] | None = None) -> list[Task] | None:
        """The next batch (blocks); None once closed; [] when `interrupt()` turns true while waiting idle."""
        with self._cond:
            while not self._tasks and not self._closed:
                if interrupt is not None and interrupt():
                    return []
                self._cond.wait()
            if self._closed:
                return None
            first = self._tasks.popleft()
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
                left = deadline - time.perf_counter()
                # wait only for tasks on their way; an idle server runs what it has at once
                if len(batch) >= self.max_batch_size or left <= 0 or self._closed or self._coming == 0:
                    break
                self._cond.wait(left)
            return batch


class Replica:
    """One `Predictor` (one device, or one `device_map` split) and the worker thread that feeds it."""

    def __init__(self, name: str, placement: dict[str, Any], batcher: Batcher):
        self.name, self.placement, self.batcher = name, placement, batcher
        self.predictor: Predictor | None = None
        self.lock = threading.Lock()  # held while the model runs; a model switch takes it to swap predictors
        self.batches = 0
        self.images = 0
        self._thread: threading.Thread | None = None
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the worker thread before batches

    def start(self, on_error: Callable[[BaseException], None]) -> None:
        self._thread = threading.Thread(target=self._loop, args=(on_error,), name=f"vseg-{self.name}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs `fn` on this replica's worker thread, between batches (warm-up: torch.compile's CUDA-graph trees
        belong to the thread that records them, so the graphs must be recorded where the model will run)."""
        future: Future = Future()
        if self._thread is None or not self._thread.is_alive():
            future.set_exception(RuntimeError(f"{self.name}: its worker thread is not running"))
            return future
        self._calls.append((fn, future))
        self.batcher.wake()
        return future

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            try:
                future.set_result(fn())
            except BaseException as err:  # the caller gets it; the worker goes on
                future.set_exception(err)

    def _loop(self, on_error: Callable[[BaseException], None]) -> None:
        while True:
            self._run_calls()
            batch = self.batcher.take(lambda: bool(self._calls))
            if batch is None:
                break
            if not batch:
                continue
            try:
                self._run(batch)
            except BaseException as err:  # never lose the worker: each task gets the error, the loop goes on
                for task in batch:
                    if not task.future.done():
                        task.future.set_exception(err)
                on_error(err)

    def _run(self, batch: list[Task]) -> None:
        start = time.perf_counter()
        with self.lock:
            predictor = self.predictor
            assert predictor is not None, "a worker runs only after its model is loaded"
            parts: dict[str, float] = {}
            if batch[0].kind == "refine":
                t = batch[0]
                results: list[Any] = [predictor.refine(t.image, t.prompt, t.points, t.labels)]
            else:
                results = self._predict(predictor, batch, parts)
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
    def _predict(
        cls, predictor: Predictor, batch: list[Task], parts: dict[str, float] | None = None
    ) -> list[ItemPrediction | BaseException]:
        """One model call for the batch; if it fails, each task alone, so one bad input fails only itself.

        The same steps as `Predictor.predict` (the processor's features, `collate`, the predictor on the batch),
        so a served mask is the mask predict.py writes for the image. The probability maps are computed only
        when a task of the batch needs them. `parts` gets where the call's time went (`Outcome.parts`).
        """
        mode = batch[0].mode
        parts = {} if parts is None else parts
        # a CUDA model: images stacked into cached page-locked memory (no page faults per batch, fast copy)
        pin = predictor.device is not None and predictor.device.type == "cuda"

        def run(tasks: list[Task]) -> list[Any]:
            start = time.perf_counter()
            collated = collate(predictor.processor, cls._samples(predictor, tasks), pin)
            parts["collate_ms"] = 1000 * (time.perf_counter() - start)
            return list(predictor(collated, mode, any(t.probability for t in tasks), parts))

        try:
            return run(batch)
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
