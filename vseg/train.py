"""`train.py`'s body: validated config -> run directory -> model, data, trainer -> fit -> trainable weights."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from vseg.config import TrainConfig, load_config
from vseg.data.datamodule import VesselDataModule
from vseg.model.build import build_sa2va, count_parameters
from vseg.model.processor import Sa2VAProcessor
from vseg.module import Sa2VAModule, trainable_state_dict
from vseg.strategy import build_strategy

log = logging.getLogger(__name__)

RUN_DIR_ENV = "VSEG_RUN_DIR"


@dataclass
class RunResult:
    """Where a run wrote its outputs and how far it got."""

    run_dir: Path
    global_step: int
    metrics: dict[str, float]
    module: Sa2VAModule | None = None  # the trained module (for callers in the same process, e.g. tests)


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """One directory per run, the same on every rank.

    Precedence: `run_dir=`; the directory of a resumed checkpoint (`ckpt_path=RUN/checkpoints/x.ckpt`);
    the directory chosen by the launching process (passed to Lightning's worker processes through the
    environment); a new `runs_root/<timestamp>` (torchrun: named by its run id so all ranks agree).
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    elif cfg.ckpt_path and Path(cfg.ckpt_path).parent.name == "checkpoints":
        path = Path(cfg.ckpt_path).parent.parent
    elif os.environ.get(RUN_DIR_ENV):
        path = Path(os.environ[RUN_DIR_ENV])
    else:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        name = f"torchrun-{run_id}" if run_id and run_id != "none" else time.strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(cfg.runs_root) / f"{name}_{cfg.model.name}"
    path = path.resolve()
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def build_trainer(cfg: TrainConfig, run_dir: Path) -> L.Trainer:
    """Lightning Trainer with TensorBoard logging under the run dir and step checkpoints."""
    ckpt = cfg.checkpoint
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=ckpt.every_n_steps,
            save_top_k=ckpt.keep,
            monitor="step",
            mode="max",
            save_last=ckpt.save_last,
        ),
    ]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TQDMProgressBar(refresh_rate=int(cfg.callbacks.get("progress_refresh_rate", 1))))
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False)
    return L.Trainer(
        strategy=build_strategy(cfg.strategy),
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # VesselDataModule shards the data itself
        **cfg.trainer,
    )


def run(raw_cfg: DictConfig | TrainConfig) -> RunResult:
    """Trains Sa2VA as configured; returns the run directory and the final logged metrics."""
    cfg = raw_cfg if isinstance(raw_cfg, TrainConfig) else load_config(raw_cfg)
    run_dir = resolve_run_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    # Built right after seeding: a randomly initialised base is then reproducible from the run's config.
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    trainer = build_trainer(cfg, run_dir)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        log.info("run directory: %s", run_dir)

    log.info("parameters: %s", count_parameters(model))
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    datamodule = VesselDataModule(cfg.data, processor, accumulate=accumulate)
    module = Sa2VAModule(model, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    if cfg.checkpoint.save_last and not trainer.interrupted:
        # The step checkpoints fire every N steps; the final state is kept as last.ckpt too (all ranks
        # take part: under DeepSpeed saving is collective).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")

    if trainer.is_global_zero:
        weights = run_dir / "weights"
        weights.mkdir(exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(module.model).items()}
        save_file(state, weights / "trainable.safetensors", metadata={"global_step": str(trainer.global_step)})
        print(f"\nrun directory: {run_dir}\nTensorBoard:   tensorboard --logdir {run_dir}\n", flush=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return RunResult(run_dir=run_dir, global_step=trainer.global_step, metrics=metrics, module=module)
