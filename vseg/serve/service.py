"""The served model: where its replicas live, loading them, switching to another checkpoint without a restart.

Placements follow predict.py's keys: `devices=auto` (a replica per visible GPU, the CPU when there is none),
`devices=N` / `devices=[0, 2]` (a replica per listed GPU), `device=cuda:1` / `device=cpu` (one replica),
`device_map=balanced max_memory={0: 12GB, 1: 12GB}` (one replica split over GPUs). Every replica is a
`Predictor` built from one resolved source, so all of them serve the same weights the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from vseg.artifacts.sources import ModelSource, resolve_source
from vseg.config import ConfigError, ModelConfig, ServeConfig
from vseg.config.serve import CUDA_GRAPH_MODES
from vseg.inference.inputs import DEFAULT_PROMPT, collate
from vseg.inference.placement import parse_max_memory, resolve_device
from vseg.inference.predictor import Predictor
from vseg.serve.batcher import Batcher, Replica, Task
from vseg.serve.prepare import ImageSource, chain, encode, prepare, process_pool

log = logging.getLogger(__name__)


def placements(cfg: ServeConfig, cuda_count: int | None = None) -> list[dict[str, Any]]:
    """`Predictor.from_source` placement arguments, one dict per replica."""
    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if cfg.device_map is not None:
        if count == 0:
            raise ConfigError(f"device_map={cfg.device_map} splits a model over GPUs and no CUDA GPU is visible")
        return [{"device_map": cfg.device_map, "max_memory": parse_max_memory(cfg.max_memory)}]
    devices = cfg.devices
    if devices is None:
        return [{"device": cfg.device}]
    if devices == "auto":
        return [{"device": f"cuda:{i}"} for i in range(count)] or [{"device": "cpu"}]
    indices = list(range(devices)) if isinstance(devices, int) else list(devices)
    missing = [i for i in indices if i >= count]
    if missing:
        raise ConfigError(f"devices={devices}: GPU {missing} not visible ({count} CUDA GPUs here)")
    return [{"device": f"cuda:{i}"} for i in indices]


def check_compile(cfg: ServeConfig, placements: list[dict[str, Any]]) -> None:
    """compile_mode=reduce-overhead records CUDA graphs: refused (one clear message) for a replica on the CPU."""
    if not (cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES):
        return
    for placement in placements:
        device = placement.get("device")
        if device is not None and resolve_device(device).type != "cuda":
            raise ConfigError(
                f"compile_mode={cfg.compile_mode} records CUDA graphs and needs a GPU, but a replica would run on "
                f"{resolve_device(device)} (device={cfg.device}, devices={cfg.devices}): use compile_mode=default "
                "or compile=false on the CPU"
            )


def warm_up(predictor: Predictor, sizes: list[int], side: int = 512) -> dict[int, float]:
    """Runs the model once per batch size on a `side`-px image through the server's path; {size: seconds}.

    With compile=true the first call per shape compiles the blocks (and with CUDA graphs records them), so a
    request of a warmed-up size does not pay for it. Images of another tile count or prompts beyond the text
    padding still compile or record on first use. Call it on the thread that will run the model.
    """
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    sample = encode(predictor.processor, image, DEFAULT_PROMPT, predictor.answer_text)
    seconds = {}
    for size in sizes:
        start = time.perf_counter()
        predictor(collate(predictor.processor, [sample] * size), "teacher_forced", False)
        seconds[size] = round(time.perf_counter() - start, 2)
    return seconds


def model_config(node: dict[str, Any] | None) -> ModelConfig | None:
    """`model=<preset>` (+ `model.*` keys) as a ModelConfig; None when no preset was named."""
    if not node or "name" not in node:
        return None
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def pool_size(cfg: ServeConfig) -> int:
    """Preparation threads: `workers`, or (0) one per CPU core up to 8 (PIL and torch release the GIL there)."""
    return cfg.workers or max(2, min(8, os.cpu_count() or 2))


class Service:
    """Replicas over one batch queue; `load` in the background so /health can say "starting" meanwhile.

    Requests are decoded and encoded on a pool of threads (`prepare`) before they reach the queue, and their
    responses are encoded there too (`pool`), so neither the event loop nor a replica's worker does that work.
    """

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.batcher = Batcher(cfg.max_batch_size, cfg.batch_timeout_ms / 1000)
        self.replicas = [Replica(f"replica{i}", p, self.batcher) for i, p in enumerate(placements(cfg))]
        check_compile(cfg, [r.placement for r in self.replicas])
        self.pool = ThreadPoolExecutor(pool_size(cfg), thread_name_prefix="vseg-prepare")
        # SAM-2's resize of an image, beside its tiles on a preparing thread (`prepare.encode`, `_resize_pool`);
        # its jobs never wait on anything, so a full pool cannot deadlock
        self.resize_pool = ThreadPoolExecutor(pool_size(cfg), thread_name_prefix="vseg-resize")
        self.processes: Executor | None = None  # prepare=processes: spawned once the processor is known
        self.ckpt = cfg.ckpt
        self.source: ModelSource | None = None
        self.state = "starting"  # starting | ready | failed
        self.stage = "loading"  # while starting: loading | warming up (compiling, recording CUDA graphs)
        self.warmup_seconds: dict[str, dict[int, float]] = {}  # replica -> batch size -> seconds
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.switches = 0
        self._switching = threading.Lock()
        self.worker_errors = 0

    # ------------------------------------------------------------------------------------------ loading
    def _predictor(self, source: ModelSource, placement: dict[str, Any]) -> Predictor:
        c = self.cfg
        return Predictor.from_source(
            source,
            **placement,
            dtype=c.dtype,
            compile=c.compile,
            compile_mode=c.compile_mode,
            resize=c.resize,
            answer_text=c.answer_text,
            max_new_tokens=c.max_new_tokens,
            threshold=c.threshold,
        )

    def load(self) -> None:
        """Builds every replica and starts its worker; failures are kept for /health (the server stays up)."""
        try:
            self.source = resolve_source(self.ckpt, model_config(self.cfg.model))
            for replica in self.replicas:
                replica.predictor = self._predictor(self.source, replica.placement)
                replica.start(self._worker_error)
            self._cap_cpu_threads()
            self.stage = "warming up"
            self._install({r.name: r.predictor for r in self.replicas})  # type: ignore[misc]
            self._start_processes()
            self.loaded_at, self.state = time.time(), "ready"
            log.info("vseg serve: %d replica(s) ready", len(self.replicas))
        except Exception as err:  # e.g. a checkpoint that does not fit its config: /health reports it
            self.state, self.error = "failed", f"{type(err).__name__}: {err}"
            log.error("vseg serve: loading %s failed: %s", self.ckpt, self.error)

    def _cap_cpu_threads(self) -> None:
        """With the model on GPUs only, torch's CPU work is the preparation pool's small copies: each pool thread
        with an OpenMP team as wide as the machine would run pool x cores threads and stall on their barriers,
        so the intra-op width becomes cores / pool threads (as a DataLoader worker process gets one thread)."""
        if all(r.predictor is not None and r.predictor.device.type == "cuda" for r in self.replicas):
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // pool_size(self.cfg)))

    def _start_processes(self) -> None:
        """prepare=processes: a fresh pool with the served model's processor, its processes started now."""
        if self.cfg.prepare != "processes":
            return
        processor = self.replicas[0].predictor.processor  # type: ignore[union-attr]
        old, self.processes = self.processes, process_pool(self.cfg, processor, pool_size(self.cfg))
        list(self.processes.map(abs, range(pool_size(self.cfg))))  # spawn and import before /health says ready
        if old is not None:
            old.shutdown(wait=False, cancel_futures=False)

    def _install(self, fresh: dict[str, Predictor]) -> None:
        """Each replica's worker thread warms its new predictor up (`warm_up`; all replicas at once) and then
        serves with it: compiled code and CUDA graphs belong to the thread that runs the model."""
        sizes = self.cfg.warmup_sizes()

        def install(replica: Replica, predictor: Predictor) -> dict[int, float]:
            seconds = warm_up(predictor, sizes) if sizes else {}
            with replica.lock:
                replica.predictor = predictor
                replica.pad_sizes = sizes if self.cfg.pads_batches() else []
            return seconds

        jobs = [(r, r.call(lambda r=r: install(r, fresh[r.name]))) for r in self.replicas]
        for replica, job in jobs:
            self.warmup_seconds[replica.name] = job.result()
        if sizes:
            log.info("vseg serve: warmed up batch sizes %s in %s s", sizes, self.warmup_seconds)

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="vseg-load", daemon=True)
        thread.start()
        return thread

    def _worker_error(self, err: BaseException) -> None:
        self.worker_errors += 1
        log.error("vseg serve: a batch failed: %s: %s", type(err).__name__, err)

    def switch(self, ckpt: str) -> None:
        """Serves `ckpt` from now on, on the same placements; the old model keeps serving if loading fails.

        Each replica's new predictor is built next to the old one (briefly both in memory), then swapped under
        the replica's lock, so no batch sees a half-switched model.
        """
        if not self._switching.acquire(blocking=False):
            raise ConfigError("a model switch is already running; wait for it to finish")
        try:
            source = resolve_source(ckpt, model_config(self.cfg.model) if ckpt == "random" else None)
            self._install({r.name: self._predictor(source, r.placement) for r in self.replicas})
            self.source, self.ckpt, self.switches = source, ckpt, self.switches + 1
            self._start_processes()
            self.loaded_at = time.time()
        finally:
            self._switching.release()

    def close(self) -> None:
        self.batcher.close()
        for replica in self.replicas:
            replica.join(timeout=5)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.resize_pool.shutdown(wait=False, cancel_futures=True)
        if self.processes is not None:
            self.processes.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------------------------------ running
    def submit(self, task: Task) -> Future:
        """Queues a task as it is (a segment task without features is encoded by the worker)."""
        return self.batcher.submit(task)

    def prepare_segment(self, source: ImageSource, mode: str, prompt: str, probability: bool = True) -> Future:
        """Decodes and encodes one image on the pool (threads or processes), then queues it; the future is the
        task's (its `Outcome`, or the error of any step: the request's ApiError, ValueError from the processor).
        `probability`: the request needs the probability map (its PNG, or a threshold other than the server's)."""
        future: Future = Future()
        predictor = self.replicas[0].predictor
        assert predictor is not None, "requests are prepared only once the model is loaded"
        processor = predictor.processor
        answer = predictor.answer_text if mode == "teacher_forced" else None
        start = time.perf_counter()

        def then(result: Any, error: BaseException | None) -> None:
            if error is not None:
                self.batcher.withdraw()
                future.set_exception(error)
                return
            image, sample = result
            task = Task("segment", mode, image, prompt, future=future, sample=sample, encoded_by=processor,
                        probability=probability)  # fmt: skip
            task.prepare_ms = 1000 * (time.perf_counter() - start)
            try:
                self.batcher.submit(task, announced=True)
            except RuntimeError as err:
                future.set_exception(err)

        self.batcher.announce()
        try:
            if self.processes is not None:
                split = self._resize_pool() is not None
                job = self.processes.submit(prepare, source, prompt, answer, split=split)
            else:
                job = self.pool.submit(prepare, source, prompt, answer, self.cfg, processor, self._resize_pool())
        except RuntimeError as err:  # the pool is shut down
            then(None, err)
            return future
        chain(job, then)
        return future

    def _resize_pool(self) -> Executor | None:
        """The resize pool while cores are idle (at most one request in preparation per two cores); on a busy
        server each preparing thread resizes alone: a hand-off to another thread then only adds waiting."""
        return self.resize_pool if self.batcher.coming <= max(1, (os.cpu_count() or 1) // 2) else None

    def prepare(self, make: Callable[[], Task]) -> Future:
        """Runs `make` (decoding: raises the request's ApiError) on the thread pool, then queues its task (refine:
        no processor step); the future is the task's."""
        future: Future = Future()
        start = time.perf_counter()

        def then(task: Task | None, error: BaseException | None) -> None:
            if error is not None or task is None:
                self.batcher.withdraw()
                future.set_exception(error or RuntimeError("no task"))
                return
            task.future, task.prepare_ms = future, 1000 * (time.perf_counter() - start)
            try:
                self.batcher.submit(task, announced=True)
            except RuntimeError as err:
                future.set_exception(err)

        self.batcher.announce()
        try:
            chain(self.pool.submit(make), then)
        except RuntimeError as err:
            then(None, err)
        return future

    def info(self) -> dict[str, Any]:
        """What is loaded, where, in which dtype (GET /v1/model)."""
        src = self.source
        first = self.replicas[0].predictor if self.replicas else None
        run_dir = getattr(src, "run_dir", None)
        return {
            "state": self.state,
            "ckpt": self.ckpt,
            "form": getattr(src, "form", None),
            "run_dir": str(run_dir) if isinstance(run_dir, Path) else run_dir,
            "model": dataclasses.asdict(src.model_cfg) if src is not None else None,
            "dtype": first.dtype if first else None,
            "answer_text": first.answer_text if first else None,
            "threshold": self.cfg.threshold,
            "max_batch_size": self.cfg.max_batch_size,
            "compile": self.cfg.compile,
            "compile_mode": self.cfg.compile_mode if self.cfg.compile else None,
            "warmup_seconds": self.warmup_seconds,
            "batch_timeout_ms": self.cfg.batch_timeout_ms,
            "replicas": [
                {
                    "name": r.name,
                    "device": str(r.predictor.device) if r.predictor else None,
                    "device_map": r.placement.get("device_map"),
                    "batches": r.batches,
                    "images": r.images,
                }
                for r in self.replicas
            ],
            "switches": self.switches,
            "loaded_at": self.loaded_at,
        }
