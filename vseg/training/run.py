"""`train.py`'s body: validated config -> run directory -> model, data, trainer -> fit -> trainable weights."""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from vseg.artifacts.checkpoints import PlainCheckpointIO, checkpoint_step, newest_checkpoint
from vseg.artifacts.deepspeed import trainable_weights_from_checkpoint
from vseg.artifacts.files import atomic_write, check_writable, save_safetensors
from vseg.artifacts.loading import load_torch_file
from vseg.artifacts.runs import load_train_config
from vseg.config import (
    LORA_SHAPE_FIELDS,
    ConfigError,
    TrainConfig,
    describe_differences,
    differences,
    load_config,
    model_differences,
)
from vseg.console import ModelSummary, ProgressBar
from vseg.data.datamodule import VesselDataModule, checked_dataset
from vseg.model.build import count_parameters
from vseg.model.processor import Sa2VAProcessor
from vseg.model.sizes import build_on_meta
from vseg.planner import OOMGuard, check_sam_cache, prepare_run
from vseg.planner.disk import cache_size
from vseg.strategy import build_strategy, is_deepspeed
from vseg.training.faults import FaultInjection, RankWatchdog, RunCheckpoint, TestFaults, save_checkpoint_atomic
from vseg.training.feature_cache import FrozenFeatures
from vseg.training.module import Sa2VAModule, trainable_state_dict
from vseg.training.monitor import PerfMonitor
from vseg.training.speed import cuda_graphs_apply
from vseg.training.zero3 import model_for_run

log = logging.getLogger(__name__)

RUN_DIR_ENV = "VSEG_RUN_DIR"


@dataclass
class RunResult:
    """Where a run wrote its outputs and how far it got."""

    run_dir: Path
    global_step: int
    metrics: dict[str, float]
    module: Sa2VAModule | None = None  # the trained module (for callers in the same process, e.g. tests)
    stopped_by: str | None = None  # the signal that interrupted the run (a resumable checkpoint was saved)
    exit_code: int = 0  # what train.py exits with: 128 + signal number when a signal stopped the run
    resumed_from: Path | None = None  # the checkpoint this run continued from


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """One directory per run, the same on every rank.

    Precedence: `run_dir=`; the directory of a resumed checkpoint (`ckpt_path=RUN/checkpoints/x.ckpt`);
    the directory chosen by the launching process (passed to Lightning's worker processes through the
    environment); with `resume=auto`, the newest run of this model under `runs_root` that has a complete
    checkpoint; a new `runs_root/<timestamp>` (torchrun: named by its run id so all ranks agree).
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    elif cfg.ckpt_path and Path(cfg.ckpt_path).parent.name == "checkpoints":
        path = Path(cfg.ckpt_path).parent.parent
    elif os.environ.get(RUN_DIR_ENV):
        path = Path(os.environ[RUN_DIR_ENV])
    elif cfg.resume == "auto" and (found := latest_run(Path(cfg.runs_root), cfg.model.name)) is not None:
        path = found
    else:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        name = f"torchrun-{run_id}" if run_id and run_id != "none" else time.strftime("%Y-%m-%d_%H-%M-%S")
        path = Path(cfg.runs_root) / f"{name}_{cfg.model.name}"
    path = path.resolve()
    os.environ[RUN_DIR_ENV] = str(path)
    return path


def latest_run(runs_root: Path, model_name: str) -> Path | None:
    """The most recently written `runs_root/*_<model_name>` run that has a complete checkpoint."""
    best: tuple[float, Path] | None = None
    for run in runs_root.glob(f"*_{model_name}") if runs_root.is_dir() else []:
        ckpt = newest_checkpoint(run / "checkpoints")
        if ckpt is not None and (best is None or ckpt.stat().st_mtime > best[0]):
            best = (ckpt.stat().st_mtime, run)
    return best[1] if best else None


def resume_checkpoint(cfg: TrainConfig, run_dir: Path) -> Path | None:
    """The checkpoint this run continues from: `ckpt_path=`, else the run directory's newest complete one.

    Re-running a command in the same run directory therefore continues it (every rank picks the same
    file: the choice is made before any rank can write a new one). `resume=never` refuses a run
    directory that already has checkpoints rather than mixing two runs in it.
    """
    if cfg.ckpt_path:
        return Path(cfg.ckpt_path)
    newest = newest_checkpoint(run_dir / "checkpoints")
    if newest is not None and cfg.resume == "never":
        raise ConfigError(
            f"resume=never but {run_dir} already has checkpoints (newest {newest.name}): "
            "choose another run_dir=, or drop resume=never to continue that run"
        )
    return newest


def run_conflicts(old: TrainConfig, new: TrainConfig) -> list[tuple[str, object, object]]:
    """What makes `new` a different model from the run `old`: architecture fields and the trainable set."""
    contradictions, _ = model_differences(old.model, dataclasses.asdict(new.model), only_given=False)
    if old.model.path != new.model.path:
        contradictions.append(("model.path", old.model.path, new.model.path))
    lora = differences(
        {k: getattr(old.lora, k) for k in LORA_SHAPE_FIELDS},
        {k: getattr(new.lora, k) for k in LORA_SHAPE_FIELDS},
        "lora",
    )
    return contradictions + lora


def check_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    """Refuses to write into a directory that holds the run of another model (its config.yaml says so)."""
    existing = run_dir / "config.yaml"
    if not existing.is_file():
        return
    other = load_train_config(existing, "existing run")
    found = run_conflicts(other, cfg)
    if found:
        raise ConfigError(
            f"run_dir={run_dir} holds a run of model {other.model.name}, and this command trains model "
            f"{cfg.model.name}: {describe_differences(found, 'that run', 'this command')}; nothing was written: "
            f"continue that run with its own settings (model={other.model.name}), or choose another run_dir= "
            "(without ckpt_path= of that run)"
        )


def check_resume(cfg: TrainConfig, ckpt: Path, run_dir: Path) -> None:
    """Refuses a checkpoint this run cannot continue from, before anything is built or written: missing,
    unreadable, UNSAFE, or written for another model (its run's config.yaml, else its trainable weights)."""
    if not ckpt.exists():
        raise ConfigError(f"ckpt_path={ckpt}: no such file or directory")
    for config_file in (ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"):
        if config_file.is_file() and config_file != run_dir / "config.yaml":
            other = load_train_config(config_file, "checkpoint's run")
            found = run_conflicts(other, cfg)
            if found:
                raise ConfigError(
                    f"ckpt_path={ckpt} was written by a run of model {other.model.name}, and this command trains "
                    f"model {cfg.model.name}: {describe_differences(found, 'checkpoint', 'this command')}; nothing "
                    f"was written: resume with model={other.model.name} (and that run's settings)"
                )
            break
    if ckpt.is_dir():
        return  # DeepSpeed directory: DeepSpeed itself loads its shards strictly
    state = load_torch_file(ckpt)  # truncated, foreign or UNSAFE files: one CheckpointError naming the file
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise ConfigError(f"ckpt_path={ckpt}: holds no `state_dict`; not a Lightning checkpoint written by vseg")
    if cfg.model.path is not None:
        return  # the architecture comes from the folder: Lightning checks the keys when it restores
    model, _ = build_on_meta(cfg.model, cfg.lora)
    expected = {f"model.{n}": tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    saved = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    shapes = [
        f"{k}: {saved[k]} vs {expected[k]}" for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]
    ]
    if missing or unexpected or shapes:
        raise ConfigError(
            f"ckpt_path={ckpt} holds the trainable weights of another model than this command's model "
            f"{cfg.model.name} (missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}, "
            f"other shapes {len(shapes)} {shapes[:3]}); nothing was written: resume with the model and lora settings "
            "it was trained with"
        )


def build_trainer(cfg: TrainConfig, run_dir: Path, resume_step: int | None = None) -> L.Trainer:
    """Lightning Trainer with TensorBoard logging under the run dir, atomic step checkpoints that
    survive signals, and (several processes) the rank watchdog.

    `resume_step`: the global step of the checkpoint the run continues from. TensorBoard then drops the
    earlier events from that step on (`purge_step`): after a kill -9 the steps run since the last
    checkpoint were logged once already and run again, and the curves must show each step once.
    """
    ckpt = cfg.checkpoint
    faults = TestFaults.from_env()  # test-only injections (VSEG_TEST_*): none unless the environment asks
    callbacks: list[L.Callback] = [
        OOMGuard(),  # first: records phase, step and GPU memory before the others react to an OOM
        # Ahead of RunCheckpoint: a step's faults and trace land before that step's checkpoint is written.
        *([FaultInjection(faults)] if faults.active else []),
        RunCheckpoint(
            run_dir / "checkpoints",
            every_n_steps=ckpt.every_n_steps,
            keep=ckpt.keep,
            handle_signals=cfg.faults.handle_signals,
            commit_delay_s=faults.checkpoint_delay_s,
        ),
    ]
    if cfg.faults.watchdog:
        callbacks.append(RankWatchdog(heartbeat_timeout_s=cfg.faults.heartbeat_timeout_s))
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar(refresh_rate=int(cfg.callbacks.get("progress_refresh_rate", 1))))
    if cfg.trainer.get("enable_model_summary", False):
        callbacks.append(ModelSummary())  # Lightning's table without its always-zero FLOPs (vseg/console)
    callbacks.append(PerfMonitor.from_config(cfg.callbacks))  # memory, samples/s, tokens/s, MFU (vseg/monitor)
    purge = {"purge_step": resume_step} if resume_step else {}
    logger = TensorBoardLogger(save_dir=str(run_dir), name="", version="tensorboard", default_hp_metric=False, **purge)
    strategy = build_strategy(cfg.strategy, micro_batch=cfg.data.batch_size)
    return L.Trainer(
        strategy=strategy,
        logger=logger,
        callbacks=callbacks,
        # Checkpoint files written in place under vseg's temporary name (DeepSpeed writes its own directories).
        plugins=[] if is_deepspeed(strategy) else [PlainCheckpointIO()],
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,  # VesselDataModule shards the data itself
        # RunCheckpoint writes the checkpoints; Lightning's default ModelCheckpoint would add non-atomic
        # epoch checkpoints under tensorboard/checkpoints.
        **{"enable_checkpointing": False, **cfg.trainer},
    )


def finished_message(run_dir: Path) -> str:
    """What a finished training prints last: where the run is, how to look at it, what to run next."""
    ckpt = shlex.quote(f"ckpt={run_dir}")
    return (
        f"\nrun directory: {run_dir}\n"
        f"TensorBoard:   tensorboard --logdir {shlex.quote(str(run_dir))}\n"
        f"predict:       python predict.py {ckpt} input=<image|folder|glob> output=<dir>\n"
        f"               (without input= and output=: its validation images, into {run_dir / 'predictions'})\n"
    )


def _is_rank_zero() -> bool:
    """Before the Trainer exists: rank 0 of a launched job (torchrun / SLURM / Lightning's own launcher)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def run(raw_cfg: DictConfig | TrainConfig) -> RunResult:
    """Trains Sa2VA as configured; returns the run directory and the final logged metrics."""
    cfg = raw_cfg if isinstance(raw_cfg, TrainConfig) else load_config(raw_cfg)
    cfg = prepare_run(cfg)  # data.global_batch_size split, strategy=auto resolved, GPU report (vseg/planner)
    run_dir = resolve_run_dir(cfg)
    # Every check comes before anything is written: a refused command leaves every run directory as it was.
    check_run_dir(cfg, run_dir)
    # Chosen before any rank can write a new checkpoint, so every rank picks the same one.
    resume = resume_checkpoint(cfg, run_dir)
    if resume is not None:
        check_resume(cfg, resume, run_dir)
    if _is_rank_zero():  # before anything is read or built: an unwritable run directory fails in a second
        check_writable(run_dir, "run directory (run_dir= / runs_root=)")
    # The data is read and checked before the model is built: bad data fails in seconds, with the full list.
    data_report = checked_dataset(cfg.data, progress=_is_rank_zero())
    if _is_rank_zero():
        log.info("data:\n%s", data_report.format(limit=20))
    check_sam_cache(cfg, len(data_report.train))  # one entry per training image: refused if it cannot fit
    L.seed_everything(cfg.seed, workers=True, verbose=_is_rank_zero())  # every rank seeds; one says so
    # Built right after seeding: a randomly initialised base is then reproducible from the run's config.
    # ZeRO-3: `model` is a stand-in (meta device, or the CPU-loaded base) and `builder` makes the partitioned
    # model inside configure_model; otherwise `model` is the model (builder None).
    model, tokenizer, builder = model_for_run(cfg)
    if cfg.feature_cache.enabled and not cfg.feature_cache.dir:  # recorded in config.yaml: where the cache lives
        cfg = dataclasses.replace(
            cfg, feature_cache=dataclasses.replace(cfg.feature_cache, dir=str(run_dir / "feature_cache"))
        )
    if cfg.feature_cache.enabled and _is_rank_zero():
        log.info("%s; in %s", cache_size(cfg, len(data_report.train)).line(True), cfg.feature_cache.dir)
    trainer = build_trainer(cfg, run_dir, checkpoint_step(resume) if resume is not None else None)
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "config.yaml")
        log.info("run directory: %s", run_dir)
        log.info("parameters: %s", count_parameters(model))
    # Always PIL's resize (no `resize=` here): training must see the pixels inference defaults to (and the authors
    # trained on); predict/serve's resize=torch is an opt-in speed option that stays within 1-2 grey levels of it.
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    if cuda_graphs_apply(cfg.speed, is_deepspeed(trainer.strategy), False, trainer.strategy.root_device.type):
        processor.pad_multiple = cfg.speed.pad_tokens  # a few text lengths, each recorded once
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1))
    # The loader's workers name the disk cache's entries on disk; they are read as each batch is pinned, through
    # this process's store for that directory (reads are counted where the step uses them: the module's counts).
    stores = FrozenFeatures.from_config(cfg).stores if cfg.feature_cache.enabled else None
    datamodule = VesselDataModule(cfg.data, processor, accumulate=accumulate, report=data_report, feature_stores=stores)
    module = Sa2VAModule(None if builder else model, cfg, builder)
    if resume is not None:
        log.info("resuming from %s", resume)
    # weights_only=True: a vseg checkpoint holds tensors and plain values only (torch's own default, said
    # explicitly so that Lightning does not announce a default).
    # Log lines go through tqdm.write while training: printed between the progress bars, not over them.
    with logging_redirect_tqdm():
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=str(resume) if resume is not None else None,
            weights_only=True,
        )
    checkpoints = next(c for c in trainer.callbacks if isinstance(c, RunCheckpoint))
    if checkpoints.stopped_by:
        signum = checkpoints.stop.signum or 15
        if trainer.is_global_zero:
            print(
                f"\nvseg: stopped by {checkpoints.stopped_by} at step {trainer.global_step}; "
                f"resumable checkpoint: {checkpoints.last_saved}\n"
                f"continue with the same command and run_dir={run_dir} (or resume=auto)\n",
                flush=True,
            )
        return RunResult(
            run_dir=run_dir,
            global_step=trainer.global_step,
            metrics={},
            module=module,
            stopped_by=checkpoints.stopped_by,
            # rank 0 reports the signal; the other ranks end cleanly, so that launchers watching them
            # (Lightning's, torchrun) do not kill rank 0 while it finishes.
            exit_code=128 + int(signum) if trainer.is_global_zero else 0,
            resumed_from=resume,
        )
    deepspeed_run = is_deepspeed(trainer.strategy)
    # DeepSpeed runs always keep last.ckpt: their final weights are read from it (fp32 masters, every shard).
    if (cfg.checkpoint.save_last or deepspeed_run) and not trainer.interrupted:
        # The step checkpoints fire every N steps; the final state is kept as last.ckpt too (all ranks
        # take part: under DeepSpeed saving is collective). Atomic: a killed write keeps the old one.
        save_checkpoint_atomic(trainer, run_dir / "checkpoints" / "last.ckpt")

    if trainer.is_global_zero:
        last = run_dir / "checkpoints" / "last.ckpt"
        gathered = trainable_weights_from_checkpoint(last) if deepspeed_run and last.is_dir() else None
        state = gathered or {k: v.detach().cpu().contiguous() for k, v in trainable_state_dict(module.model).items()}
        metadata = {"global_step": str(trainer.global_step)}
        atomic_write(
            run_dir / "weights" / "trainable.safetensors",
            lambda p: save_safetensors(state, p, metadata),
            "trained weights",
        )
        print(finished_message(run_dir), flush=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return RunResult(
        run_dir=run_dir, global_step=trainer.global_step, metrics=metrics, module=module, resumed_from=resume
    )
