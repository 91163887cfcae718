"""Data-parallel prediction on Lightning's own machinery: `Trainer.predict` + a prediction-writer callback.

One process per device (Lightning's DDP launcher re-runs the command with LOCAL_RANK set). Every process
builds the model itself in `configure_model` (directly on its GPU for `ckpt=random`), takes every
world-size-th input of the plan (`ShardSampler`: a partition, no input twice, none padded in), and the
`ResultWriter` callback writes each finished batch (masks, overlays, its rank's journal) while the next
batch runs. Rank 0 merges the journals into results.jsonl in input order once every rank is done.

The plan (which inputs still need predicting) is fixed by the launching process before any rank starts and
handed to the others in a file, so a resumed run shards exactly the same list on every rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Sampler

from vseg.data.workers import WorkerInit
from vseg.inference.engine import LoopTimes, to_device
from vseg.inference.inputs import PredictItem
from vseg.inference.outputs import OutputStore, atomic_text
from vseg.inference.predictor import Predictor

PLAN_ENV = "VSEG_PREDICT_PLAN"


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, rank + 2·world, ...: disjoint shards that together cover every index once."""

    def __init__(self, length: int, rank: int, world: int):
        self.length, self.rank, self.world = length, rank, world

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world))


def write_plan(path: Path, indices: list[int]) -> None:
    atomic_text(path, json.dumps({"todo": indices}))


def read_plan(path: Path) -> list[int]:
    return [int(i) for i in json.loads(path.read_text())["todo"]]


class PredictModule(L.LightningModule):
    """Builds the model in `configure_model` (inside each launched process) and predicts batches.

    Args:
        load: device -> its `Predictor`; the same loader as single-device prediction.
        items: the inputs still to predict, in input order.
        batch_size, num_workers: per process.
        data: dataset config for dataset inputs.
    """

    def __init__(
        self,
        load: Callable[[torch.device], Predictor],
        items: list[PredictItem],
        batch_size: int,
        num_workers: int,
        data: Any = None,
        times: LoopTimes | None = None,
        targets: dict[str, str] | None = None,
    ):
        super().__init__()
        self.load, self.items, self.targets = load, items, targets
        self.batch_size, self.num_workers, self.data = batch_size, num_workers, data
        self.model: torch.nn.Module | None = None
        self.predictor: Predictor | None = None
        self.started = self.ended = 0.0
        self.times = times if times is not None else LoopTimes()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device
        # Random init of a run's base must match single-device prediction: build where the loader says
        # (on CPU, seeded), not under Lightning's default-device context.
        with torch.device("cpu"):
            self.predictor = self.load(device)
        self.model = self.predictor.model

    def predict_dataloader(self) -> DataLoader:
        assert self.predictor is not None
        dataset = self.predictor.dataset(self.items, self.data, targets=self.targets)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ShardSampler(len(self.items), self.global_rank, self.trainer.world_size),
            num_workers=self.num_workers,
            collate_fn=dataset.collate,
            worker_init_fn=WorkerInit(),  # workers end with this rank, even after kill -9
            pin_memory=self.trainer.strategy.root_device.type == "cuda",
            persistent_workers=False,
        )

    def transfer_batch_to_device(
        self, batch: dict[str, Any], device: torch.device, dataloader_idx: int
    ) -> dict[str, Any]:
        """Only the model's tensors travel; items, host images and truths stay where the writer needs them."""
        return to_device(batch, device)

    def on_predict_start(self) -> None:
        self.trainer.strategy.barrier("vseg_predict_start")
        self.started = time.perf_counter()
        self.times.start()

    # Lightning fetches and moves a batch, runs the callbacks' batch-start hooks, then ours; after the step the
    # callbacks' batch-end hooks (the ResultWriter) run before ours. The marks split the loop accordingly.
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.times.lap("inputs")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[Any]:
        assert self.predictor is not None
        predictions = self.predictor(batch)
        self.times.lap("model")
        return predictions

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.times.lap("writing")

    def on_predict_end(self) -> None:
        with self.times.measure("writing"):
            for callback in self.trainer.callbacks:
                if isinstance(callback, ResultWriter):
                    callback.store.close()
        self.trainer.strategy.barrier("vseg_predict_end")
        self.ended = time.perf_counter()


class ResultWriter(BasePredictionWriter):
    """Writes each batch's masks, overlays and journal lines on this rank (PNG encoding on threads)."""

    def __init__(self, root: Path, overlays: bool, mode: str, workers: int = 4, targets: dict[str, str] | None = None):
        super().__init__(write_interval="batch")
        self.root, self.overlays, self.mode, self.workers, self.targets = root, overlays, mode, workers, targets
        self.store: OutputStore | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.store = OutputStore(self.root, trainer.global_rank, self.overlays, self.workers, self.targets).open()

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        write_batch(self.store, batch, prediction, self.mode)


def write_batch(store: OutputStore, batch: dict[str, Any], predictions: list[Any], mode: str) -> None:
    """Hands one batch's results to the store: failures recorded, predictions written (per image; with
    targets, a prediction and a truth are dicts target name -> value)."""
    for item, error in batch["failed"]:
        store.fail(item, error)
    for item, pred, image, truth, fov in zip(
        batch["items"], predictions, batch["images"], batch["truths"], batch["fov_masks"], strict=True
    ):
        store.submit(item, pred, image, truth, fov, mode)


def predict_data_parallel(
    *,
    load: Callable[[torch.device], Predictor],
    items: list[PredictItem],
    root: Path,
    accelerator: str,
    devices: int,
    batch_size: int,
    num_workers: int,
    overlays: bool,
    mode: str,
    data: Any = None,
    progress: bool = True,
    writer_threads: int = 4,
    times: LoopTimes | None = None,
    targets: dict[str, str] | None = None,
) -> tuple[int, float]:
    """Runs Trainer.predict over `devices` processes; returns (this process's rank, predict seconds).

    `times` receives this process's split of the loop (`LoopTimes`).
    """
    module = PredictModule(load, items, batch_size, num_workers, data, times, targets)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp",
        precision="32-true",  # the model is already in its inference dtype; no autocast, no casting
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        use_distributed_sampler=False,  # ShardSampler partitions the plan itself
        callbacks=[ResultWriter(root, overlays, mode, writer_threads, targets)],
        inference_mode=True,
    )
    trainer.predict(module, return_predictions=False)
    return trainer.global_rank, module.ended - module.started
