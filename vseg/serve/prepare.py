"""Preparing segment requests before the batch queue: decoding the image and running the processor.

`workers` threads do it by default (`prepare=threads`): PIL and torch release the GIL while they resize, so
threads overlap, but what still holds it (base64, array copies, tokens) competes with the replicas' worker
threads, which launch the model's kernels from Python. `prepare=processes` runs the same steps in
spawned processes, each with the processor, and sends the features back (tensors through shared memory, as a
DataLoader worker does); the server's own GIL then only collates, launches and answers.

Either way a sample is what `Predictor.predict` makes for the image (`PredictDataset`), so masks stay equal.
The two resizes of one image (SAM-2's 1024 px side, the MLLM's 448-px tiles) are independent: SAM-2's runs on a
second thread (`resize_pool`) while the preparing thread tiles, so one request waits for the longer of the two.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vseg.config import ServeConfig
from vseg.inference.inputs import PredictDataset, PredictItem
from vseg.serve.requests import ImageIn, decode_bytes, load_image

_PROCESS: dict[str, Any] = {}  # in a preparation process: its processor and the server's config


@dataclass
class ImageSource:
    """Where a request's image is, in a form that can cross to a preparation process."""

    what: str  # how error messages name it: images[0], image, images[1] (scan.png)
    raw: bytes | None = None  # a multipart file's bytes
    image: ImageIn | None = None  # a JSON image: base64 data or a path under the roots

    def load(self, cfg: ServeConfig) -> np.ndarray:
        if self.raw is not None:
            return decode_bytes(self.raw, cfg, self.what)
        assert self.image is not None
        return load_image(self.image, cfg, self.what)


def encode(
    processor: Any, image: np.ndarray, prompt: str, answer: str | None, resize_pool: Executor | None = None
) -> dict[str, Any]:
    """The features `Predictor.predict` makes for the image (ValueError if the processor refuses it).

    `resize_pool`: SAM-2's 1024-px resize runs there while this thread makes the MLLM's tiles (same pixels).
    """
    sample = PredictDataset([PredictItem(0, "request", prompt, pixels=image)], processor, answer, pool=resize_pool)[0]
    if "error" in sample:
        raise ValueError(f"image: {sample['error']}")
    return sample


def prepare(
    source: ImageSource,
    prompt: str,
    answer: str | None,
    cfg: ServeConfig | None = None,
    processor: Any = None,
    resize_pool: Executor | None = None,
    split: bool = True,
) -> tuple[np.ndarray, dict[str, Any]]:
    """(image, features): in a thread with the given processor and resize pool, in a process with its own
    (used when `split`: the server has idle cores)."""
    if cfg is None:
        cfg, processor = _PROCESS["cfg"], _PROCESS["processor"]
        resize_pool = _PROCESS["resize_pool"] if split else None
    image = source.load(cfg)
    return image, encode(processor, image, prompt, answer, resize_pool)


def _start_process(processor: Any, cfg: ServeConfig) -> None:
    torch.set_num_threads(1)  # as a DataLoader worker: many processes, one core each
    # one thread resizes for SAM-2 while the process tiles for the MLLM
    _PROCESS.update(processor=processor, cfg=cfg, resize_pool=ThreadPoolExecutor(1, thread_name_prefix="resize"))


def process_pool(cfg: ServeConfig, processor: Any, size: int) -> Executor:
    """Spawned processes (never forked from a process holding CUDA and threads) that prepare requests."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(size, mp_context=context, initializer=_start_process, initargs=(processor, cfg))


def chain(source: Future, then: Any) -> None:
    """Calls `then(result, error)` when `source` completes (exactly one of them is None)."""

    def done(f: Future) -> None:
        error = f.exception()
        then(None if error else f.result(), error)

    source.add_done_callback(done)
