"""Run checkpoints that survive: atomic step checkpoints, keep-last-K rotation, save on a signal, every rank's RNG.

`save_checkpoint_atomic` writes a checkpoint under a temporary name and commits it with `os.replace` (files)
or a completion marker plus a rename (DeepSpeed directories), after fsync. A write killed half way never
replaces the last good checkpoint and is never taken for the newest one; a write the file system refuses
(full, read-only) removes the temporary and raises `vseg.artifacts.files.StorageError` (one message, exit 5).
Which checkpoints are complete, the newest, rotation: `vseg.artifacts.checkpoints`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from vseg.artifacts.checkpoints import TMP_SUFFIX, bytes_of, commit, newest_checkpoint, remove, rotate_checkpoints
from vseg.artifacts.files import StorageError, storage_error
from vseg.training.faults.guard import NonFiniteError

log = logging.getLogger(__name__)

SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


def trainable_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter (this rank's shard under ZeRO-3) is finite."""
    for p in module.parameters():
        if not p.requires_grad:
            continue
        data = getattr(p, "ds_tensor", None)
        data = p.detach() if data is None else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            return False
    return True


def save_checkpoint_atomic(trainer: L.Trainer, path: Path, commit_delay_s: float = 0.0) -> Path:
    """Saves a resumable checkpoint at `path`; every rank must call it (DeepSpeed saving is collective).

    `commit_delay_s` holds the written temporary this long before it is committed: test-only
    (VSEG_TEST_CHECKPOINT_DELAY_S, `vseg.training.faults.injection`), so that a test can kill a write half way.

    Raises:
        NonFiniteError: some rank's trainable weights are NaN/Inf; nothing is written.
        StorageError: the file system refused the write (full, read-only, no permission); the temporary
            file is removed and the newest complete checkpoint stays the newest.
    """
    path = Path(path)
    strategy = trainer.strategy
    module = trainer.lightning_module
    bad = strategy.reduce_boolean_decision(not trainable_finite(module), all=False)
    if bad:
        raise NonFiniteError(
            f"step {trainer.global_step}: the trainable weights contain NaN/Inf; refusing to write {path}. "
            f"The last good checkpoint is kept: {newest_checkpoint(path.parent)}"
        )
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            remove(tmp)  # left by a write that was killed
        strategy.barrier("vseg_checkpoint_prepare")
        # weights_only=False: the full resumable state (optimizer, schedulers, loops, callbacks); collective,
        # ends with a barrier
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            if commit_delay_s:
                log.warning(
                    "VSEG_TEST_CHECKPOINT_DELAY_S: holding %s for %.1f s before committing it", tmp, commit_delay_s
                )
                time.sleep(commit_delay_s)
            commit(tmp, path, trainer.global_step)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            remove(tmp)  # nothing half-written stays behind (every rank: DeepSpeed shards are written by all)
        newest = newest_checkpoint(path.parent)
        error = storage_error(err, path, "checkpoint", needed=bytes_of(newest))
        if error is None:
            raise
        kept = f"the newest complete checkpoint is still {newest}" if newest else "no complete checkpoint exists yet"
        raise StorageError(f"{error}; {kept}") from None
    strategy.barrier("vseg_checkpoint_commit")
    return path


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and ints (loadable with weights_only)."""
    version, keys, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj: Any) -> list[Any]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        out: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out
    return [obj]


class StopRequest:
    """Turns SIGINT / SIGTERM / SIGUSR1 into a flag read at the next optimizer-step boundary.

    A second SIGINT while the first is pending exits at once (KeyboardInterrupt), as Ctrl-C Ctrl-C should.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None and signum == signal.SIGINT:
            os.write(2, b"\nvseg: second SIGINT: exiting now, without a checkpoint\n")
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
            os.write(2, f"\nvseg: {name} received: finishing this optimizer step, then saving a checkpoint\n".encode())


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class RunCheckpoint(Callback):
    """Step checkpoints, keep-last-K rotation, save-on-signal, RNG state of every rank.

    Args:
        directory: where checkpoints go (`run_dir/checkpoints`).
        every_n_steps: optimizer steps between checkpoints.
        keep: newest step checkpoints kept.
        handle_signals: SIGINT / SIGTERM / SIGUSR1 save and stop the run.
        commit_delay_s: test-only pause before each checkpoint is committed (see `save_checkpoint_atomic`).
    """

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep: int,
        handle_signals: bool = True,
        commit_delay_s: float = 0.0,
    ):
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.handle_signals = handle_signals
        self.commit_delay_s = commit_delay_s
        self.stop = StopRequest()
        self.stopped_by: str | None = None  # signal name when a signal ended the run
        self.last_saved: Path | None = None
        self._seen_step: int | None = None
        self._rng_to_restore: list[Any] | None = None

    @property
    def state_key(self) -> str:
        return "RunCheckpoint"

    # ------------------------------------------------------------ hooks
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if self._rng_to_restore:
            states = self._rng_to_restore
            set_rng_state(states[trainer.global_rank % len(states)])
            self._rng_to_restore = None
        if self.handle_signals:
            # Installed here, after Lightning's own SIGTERM handler, which would stop without saving.
            self.stop.install()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._seen_step:
            return  # inside an accumulation window: no optimizer step happened
        self._seen_step = step
        stop = self.handle_signals and trainer.strategy.reduce_boolean_decision(self.stop.signum is not None, all=False)
        if step % self.every_n_steps == 0 or stop:
            self.save(trainer, self.directory / f"step{step:07d}.ckpt")
        if stop:
            own = self.stop.signum
            self.stopped_by = signal_name(own) if own is not None else "a signal received by another rank"
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stop.uninstall()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.stop.uninstall()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["vseg_rng"] = _gather(rng_state())  # every rank's generators, indexed by rank

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("vseg_rng")

    # ------------------------------------------------------------ saving
    def save(self, trainer: L.Trainer, path: Path) -> Path:
        """Atomic save (all ranks) then rotation (rank 0)."""
        if path == self.last_saved and path.exists():
            return path
        save_checkpoint_atomic(trainer, path, self.commit_delay_s)
        self.last_saved = path
        if trainer.is_global_zero:
            for old in rotate_checkpoints(self.directory, self.keep, protect=path):
                log.info("removed old checkpoint %s", old.name)
        trainer.strategy.barrier("vseg_checkpoint_rotate")
        return path
