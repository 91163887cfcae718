"""Data-parallel prediction of runs (video, cine DICOM): one process per device, whole runs per process.

The same Lightning machinery as images (`vseg.inference.parallel`): the DDP launcher re-runs the command once
per device, every process builds the model in `configure_model`, and `ShardSampler` deals the launcher's plan
(the runs still to do) out as rank, rank + world, ...: a partition, no run twice. A run is tracked frame
after frame, so it is the unit of work: each rank reads, predicts and writes its runs whole
(`vseg.inference.run_outputs.predict_one_run`) into its own journal (`progress/runs.rank<r>.jsonl`); once every
rank is done, rank 0 merges the journals into results.jsonl and summary.json (`RunStore.finish`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from vseg.inference.parallel import ShardSampler
from vseg.inference.run_outputs import RunStore, check_can_track, predict_one_run

Entry = tuple[int, str, Path]  # (index in the input list, run id, path)


class _Entries(Dataset):
    """The planned runs as (index, id, path); each rank reads its runs' frames itself, one run at a time."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> Entry:
        return self.entries[i]


def _as_is(entry: Entry) -> Entry:
    return entry


class RunPredictModule(L.LightningModule):
    """Builds the model in `configure_model` (inside each launched process) and predicts one run per step.

    Args:
        load: device -> its `Predictor`; the same loader as one-device prediction.
        entries: the runs still to predict, in input order.
        root: the output folder (each rank writes its own journal there).
        opts: predict.py's options.
        single: the input is one run.
    """

    def __init__(self, load: Callable[[torch.device], Any], entries: list[Entry], root: Path, opts: Any, single: bool):
        super().__init__()
        self.load, self.entries, self.root, self.opts, self.single = load, entries, root, opts, single
        self.model: torch.nn.Module | None = None
        self.predictor: Any = None
        self.store: RunStore | None = None
        self.started = self.ended = 0.0

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device
        # A random-init base must equal one-device prediction's: built on the CPU, seeded, then moved.
        with torch.device("cpu"):
            self.predictor = self.load(device)
        check_can_track(self.predictor)
        self.model = self.predictor.model

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            _Entries(self.entries),
            batch_size=None,  # one run per step
            sampler=ShardSampler(len(self.entries), self.global_rank, self.trainer.world_size),
            collate_fn=_as_is,
            num_workers=0,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """A run's frames are read and streamed to the device by the tracker itself."""
        return batch

    def on_predict_start(self) -> None:
        self.store = RunStore(self.root, self.opts.overlays, self.opts.overlay_format, rank=self.global_rank)
        self.trainer.strategy.barrier("vseg_runs_start")
        self.started = time.perf_counter()

    def predict_step(self, batch: Entry, batch_idx: int) -> None:
        assert self.store is not None
        predict_one_run(lambda: self.predictor, self.store, batch, self.opts, self.single)

    def on_predict_end(self) -> None:
        self.trainer.strategy.barrier("vseg_runs_end")  # every rank's journal is complete after this
        self.ended = time.perf_counter()


def predict_runs_data_parallel(
    load: Callable[[torch.device], Any],
    entries: list[Entry],
    root: Path,
    opts: Any,
    single: bool,
    accelerator: str,
    devices: int,
) -> tuple[int, float]:
    """Runs Trainer.predict over `devices` processes; returns (this process's rank, predict seconds)."""
    module = RunPredictModule(load, entries, root, opts, single)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy="ddp",
        precision="32-true",  # the model is already in its inference dtype
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=True,
        use_distributed_sampler=False,  # ShardSampler partitions the plan itself
        inference_mode=True,
    )
    trainer.predict(module, return_predictions=False)
    return trainer.global_rank, module.ended - module.started
