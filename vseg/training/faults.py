"""Runs that survive: atomic checkpoints, resume discovery, signals, bad-number guard, rank watchdog.

What lives here (FAULTS.md tells the whole story and how each part is tested):

- `save_checkpoint_atomic` writes a checkpoint under a temporary name and commits it with `os.replace`
  (files) or a completion marker plus a rename (DeepSpeed directories), after fsync. A write killed half
  way never replaces the last good checkpoint and is never taken for the newest one; a write the file system
  refuses (full, read-only) removes the temporary and raises `vseg.artifacts.files.StorageError` (one message, exit 5).
- which checkpoints are complete, the newest, rotation: `vseg.artifacts.checkpoints`.
- `RunCheckpoint` (Lightning callback): step checkpoints every N optimizer steps, keep-last-K rotation,
  SIGINT / SIGTERM / SIGUSR1 turned into "finish this optimizer step, save on every rank, stop", the
  RNG state of every rank saved and restored, and no checkpoint ever written from non-finite weights.
- `NonFiniteGuard`: the LightningModule asks it, before every optimizer step, whether any loss or
  gradient of the step's micro-batches was NaN/Inf on any rank; such steps are skipped and counted,
  and the run stops after `faults.max_bad_steps` of them in a row.
- `RankWatchdog` (Lightning callback): with several processes, a rank that raises posts its error to
  the rendezvous store and every other rank exits within seconds with one line naming it; a rank
  that vanishes (kill -9) is noticed by its missing heartbeat.

Test-only fault injection. These environment variables exist so that tests can drive a real
`train.py` in a subprocess; nothing reads them unless they are set, and no production setting does:

    VSEG_TEST_NAN_LOSS_STEPS="3,4:1"    the loss of every micro-batch of step 3, and of micro-batch 1 of
                                        step 4's accumulation window, becomes NaN
    VSEG_TEST_NAN_GRAD_STEPS="5"        one trainable gradient becomes NaN at these steps (loss stays finite)
    VSEG_TEST_NAN_WEIGHTS_STEP="2"      a trainable weight becomes NaN after the optimizer step of this step
    VSEG_TEST_RAISE_AT="2:1"            rank 1 raises RuntimeError in training_step at step 2 ("2" = every rank)
    VSEG_TEST_CHECKPOINT_DELAY_S="30"   a checkpoint write pauses this long before it is committed
    VSEG_TEST_SIGNAL_AT="3:SIGTERM"     the process sends itself this signal in training_step at step 3
    VSEG_TEST_TRACE="trace.jsonl"       one JSON line per micro-batch: step, rank, pid, sample ids, loss

("step" is Lightning's global step while the micro-batch runs: 0 for the first optimizer step.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from vseg.artifacts.checkpoints import TMP_SUFFIX, bytes_of, commit, newest_checkpoint, remove, rotate_checkpoints
from vseg.artifacts.files import StorageError, storage_error

log = logging.getLogger(__name__)

SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf too many steps in a row, or weights became non-finite."""


# ---------------------------------------------------------------------------------------------- injection
def _env_steps(name: str) -> set[int]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return set()
    try:
        return {int(s) for s in raw.split(",") if s.strip()}
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected comma-separated step numbers") from None


def _env_step_micro(name: str) -> set[tuple[int, int | None]]:
    raw = os.environ.get(name, "").strip()
    out: set[tuple[int, int | None]] = set()
    for item in filter(None, (s.strip() for s in raw.split(","))):
        step, _, micro = item.partition(":")
        try:
            out.add((int(step), int(micro) if micro else None))
        except ValueError:
            raise ValueError(f"{name}={raw!r}: expected STEP or STEP:MICROBATCH items, comma-separated") from None
    return out


@dataclass
class TestFaults:
    """Faults to inject, read from the VSEG_TEST_* environment variables (see the module docstring)."""

    nan_loss_steps: set[tuple[int, int | None]] = field(default_factory=set)  # (step, micro-batch or None)
    nan_grad_steps: set[int] = field(default_factory=set)
    nan_weights_step: int | None = None
    raise_at: tuple[int, int | None] | None = None  # (step, rank or None = every rank)
    checkpoint_delay_s: float = 0.0
    signal_at: tuple[int, str] | None = None  # (step, signal name)
    trace: Path | None = None

    @classmethod
    def from_env(cls) -> TestFaults:
        raise_at = None
        if raw := os.environ.get("VSEG_TEST_RAISE_AT", "").strip():
            step, _, rank = raw.partition(":")
            raise_at = (int(step), int(rank) if rank else None)
        weights = os.environ.get("VSEG_TEST_NAN_WEIGHTS_STEP", "").strip()
        trace = os.environ.get("VSEG_TEST_TRACE", "").strip()
        signal_at = None
        if raw := os.environ.get("VSEG_TEST_SIGNAL_AT", "").strip():
            step, _, name = raw.partition(":")
            signal_at = (int(step), name or "SIGTERM")
        return cls(
            signal_at=signal_at,
            nan_loss_steps=_env_step_micro("VSEG_TEST_NAN_LOSS_STEPS"),
            nan_grad_steps=_env_steps("VSEG_TEST_NAN_GRAD_STEPS"),
            nan_weights_step=int(weights) if weights else None,
            raise_at=raise_at,
            checkpoint_delay_s=float(os.environ.get("VSEG_TEST_CHECKPOINT_DELAY_S", "0") or 0),
            trace=Path(trace) if trace else None,
        )

    @property
    def active(self) -> bool:
        return bool(
            self.nan_loss_steps
            or self.nan_grad_steps
            or self.nan_weights_step is not None
            or self.raise_at
            or self.checkpoint_delay_s
            or self.signal_at
        )

    def loss(self, loss: torch.Tensor, step: int, micro: int = 0) -> torch.Tensor:
        hit = (step, None) in self.nan_loss_steps or (step, micro) in self.nan_loss_steps
        return loss * float("nan") if hit else loss

    def maybe_raise(self, step: int, rank: int) -> None:
        if self.raise_at and self.raise_at[0] == step and self.raise_at[1] in (None, rank):
            raise RuntimeError(f"VSEG_TEST_RAISE_AT: injected failure on rank {rank} at step {step}")
        if self.signal_at and self.signal_at[0] == step:
            name, self.signal_at = self.signal_at[1], None  # once
            os.kill(os.getpid(), getattr(signal, name))

    def grads(self, params: Iterable[torch.nn.Parameter], step: int) -> None:
        if step in self.nan_grad_steps:
            for p in params:
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("nan")
                    return

    def weights(self, params: Iterable[torch.nn.Parameter], step: int) -> None:
        if self.nan_weights_step == step:
            with torch.no_grad():
                next(iter(params)).view(-1)[0] = float("nan")

    def record(self, step: int, rank: int, ids: list[Any], loss: torch.Tensor) -> None:
        if self.trace is None:
            return
        line = {
            "step": step,
            "rank": rank,
            "pid": os.getpid(),
            "ids": [str(i) for i in ids],
            "loss": float(loss.detach()),
        }
        with open(self.trace, "a") as f:
            f.write(json.dumps(line) + "\n")


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


def save_checkpoint_atomic(trainer: L.Trainer, path: Path, faults: TestFaults | None = None) -> Path:
    """Saves a resumable checkpoint at `path`; every rank must call it (DeepSpeed saving is collective).

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
            delay = (faults or TestFaults()).checkpoint_delay_s
            if delay:
                log.warning("VSEG_TEST_CHECKPOINT_DELAY_S: holding %s for %.1f s before committing it", tmp, delay)
                time.sleep(delay)
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


# ---------------------------------------------------------------------------------------------- RNG
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


# ---------------------------------------------------------------------------------------------- signals
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


# ---------------------------------------------------------------------------------------------- checkpoints
class RunCheckpoint(Callback):
    """Step checkpoints, keep-last-K rotation, save-on-signal, RNG state of every rank.

    Args:
        directory: where checkpoints go (`run_dir/checkpoints`).
        every_n_steps: optimizer steps between checkpoints.
        keep: newest step checkpoints kept.
        handle_signals: SIGINT / SIGTERM / SIGUSR1 save and stop the run.
        faults: test-only injections (checkpoint write delay).
    """

    def __init__(
        self,
        directory: Path,
        every_n_steps: int,
        keep: int,
        handle_signals: bool = True,
        faults: TestFaults | None = None,
    ):
        self.directory = Path(directory)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.handle_signals = handle_signals
        self.faults = faults or TestFaults()
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
        save_checkpoint_atomic(trainer, path, self.faults)
        self.last_saved = path
        if trainer.is_global_zero:
            for old in rotate_checkpoints(self.directory, self.keep, protect=path):
                log.info("removed old checkpoint %s", old.name)
        trainer.strategy.barrier("vseg_checkpoint_rotate")
        return path


# ---------------------------------------------------------------------------------------------- bad numbers
class NonFiniteGuard:
    """Collects the finiteness of every micro-batch loss of an optimizer step and decides, on all ranks
    together, whether the step is applied.

    Args:
        max_bad_steps: bad steps in a row that stop the run (0 = never stop).
        check_grads: check gradients too (skipped when a GradScaler handles fp16 overflow itself).
    """

    def __init__(self, max_bad_steps: int, check_grads: bool = True):
        self.max_bad_steps = max_bad_steps
        self.check_grads = check_grads
        self.in_a_row = 0
        self.total = 0
        self._window: list[tuple[list[Any], torch.Tensor]] = []

    def observe(self, loss: torch.Tensor, ids: list[Any]) -> None:
        """Records one micro-batch's loss (no device sync here)."""
        self._window.append((list(ids), ~torch.isfinite(loss.detach())))

    @staticmethod
    def grads_bad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
        flags = [~torch.isfinite(p.grad).all() for p in params if p.grad is not None]
        return torch.stack(flags).any() if flags else None

    def decide(self, module: L.LightningModule, grads_bad: torch.Tensor | None) -> bool:
        """True when the step must be skipped; reports it and raises after too many in a row.

        Every rank calls this at the same optimizer step (the flags are all-reduced).
        """
        window, self._window = self._window, []
        device = module.device
        loss_bad = torch.stack([flag for _, flag in window]).any() if window else torch.tensor(False)
        flags = torch.stack(
            [loss_bad.to(device), (grads_bad if grads_bad is not None else torch.tensor(False)).to(device)]
        )
        flags = flags.float()
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        any_loss_bad, any_grad_bad = (bool(v) for v in flags.tolist())
        step = module.global_step
        rank = trainer.global_rank if trainer is not None else 0
        if not (any_loss_bad or any_grad_bad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        local_bad_ids = [i for ids, flag in window if bool(flag) for i in ids]
        all_ids = [i for ids, _ in window for i in ids]
        what = "loss" if any_loss_bad else "gradient"
        if local_bad_ids:
            where = f"non-finite loss in samples {local_bad_ids}"
        elif any_loss_bad:
            where = f"non-finite loss on another rank (this rank's samples {all_ids} were finite)"
        else:
            where = f"non-finite gradient; the step's samples on this rank: {all_ids}"
        log.warning(
            "rank %d step %d: %s -> optimizer step skipped (%d in a row, %d in total)",
            rank,
            step,
            where,
            self.in_a_row,
            self.total,
        )
        if self.max_bad_steps and self.in_a_row >= self.max_bad_steps:
            raise NonFiniteError(
                f"step {step}: non-finite {what} in {self.in_a_row} optimizer steps in a row "
                f"(faults.max_bad_steps={self.max_bad_steps}); last samples on rank {rank}: {local_bad_ids or all_ids}. "
                "Lower optim.lr, check these samples (vseg check), or resume from the last checkpoint."
            )
        return True


# ---------------------------------------------------------------------------------------------- ranks
FAILED_KEY = "vseg/failed"
OOM_PREFIX = "oom: "  # on a posted failure: the failing rank ran out of GPU memory (every rank exits 4)


def _default_store() -> Any | None:
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store: the watchdog is simply off
        return None


class RankWatchdog(Callback):
    """Multi-process runs: one rank's failure (or death) stops every rank promptly, shown once.

    The failing rank writes "rank R failed at step S: <error>" to the rendezvous store before its
    exception propagates; a daemon thread on every other rank polls the store each `poll_s` seconds
    and exits the process (status 1) with that line. Each rank also beats a heartbeat counter; a rank
    whose counter stops moving for `heartbeat_timeout_s` (killed, OOM-killed) stops the others too.
    Collective timeouts (`strategy.timeout_minutes`) remain the last resort for hung collectives.
    """

    def __init__(self, heartbeat_timeout_s: float = 120.0, poll_s: float = 1.0):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.poll_s = poll_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._posted = False
        self._rank = 0
        self._world = 1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._thread is not None or trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        store = _default_store()
        if store is None:
            log.warning("no rendezvous store: the rank watchdog is off (collective timeouts still apply)")
            return
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, args=(store,), name="vseg-rank-watchdog", daemon=True)
        self._thread.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop.set()
        self._thread = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """The failing rank: show the error once (with its rank), tell the others, and exit.

        Exiting here (rather than unwinding) keeps the job's output to one traceback: the other ranks
        leave through their watchdogs with one line each instead of failing in broken collectives.
        """
        if self._thread is None or isinstance(exception, (KeyboardInterrupt, SystemExit)):
            return
        store = _default_store()
        try:
            if store is not None and store.check([FAILED_KEY]):  # another rank failed first: a consequence
                self._exit(store.get(FAILED_KEY).decode())
        except Exception:  # noqa: BLE001 - the store may already be gone
            pass
        from vseg.planner.guard import OOM_EXIT_CODE, explain, is_oom

        oom = is_oom(exception)
        if oom:  # the planner's explanation and advice instead of a stack trace, as on a single device
            message = f"{OOM_PREFIX}rank {self._rank} ran out of GPU memory at step {trainer.global_step}"
            text = explain(exception) + "\n"
        elif isinstance(exception, StorageError):  # the message says it all, as on a single device
            message = f"rank {self._rank} failed at step {trainer.global_step}: {exception}"
            text = ""
        else:
            message = f"rank {self._rank} failed at step {trainer.global_step}: {type(exception).__name__}: {exception}"
            text = "".join(traceback.format_exception(exception))
        os.write(2, f"{text}vseg: {message.removeprefix(OOM_PREFIX)} (stopping every rank)\n".encode())
        try:
            if store is not None:
                store.set(FAILED_KEY, message)
                self._posted = True
                self._stop.set()  # our own watchdog is done: the store may vanish with rank 0
                time.sleep(3 * self.poll_s)  # the other ranks' watchdogs exit before our death breaks collectives
        except Exception:  # noqa: BLE001
            pass
        for logger in trainer.loggers:
            with contextlib.suppress(Exception):
                logger.finalize("failed")
        self._exit(None, OOM_EXIT_CODE if oom else getattr(exception, "exit_code", 1))

    def _exit(self, reason: str | None, code: int = 1) -> None:
        """Leaves the process now; a rank stopped because another ran out of memory exits with the OOM status."""
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        if reason:
            if reason.startswith(OOM_PREFIX):
                from vseg.planner.guard import OOM_EXIT_CODE

                reason, code = reason.removeprefix(OOM_PREFIX), OOM_EXIT_CODE
            os.write(2, f"vseg: rank {self._rank}: stopping because {reason}\n".encode())
        os._exit(code)

    def _watch(self, store: Any) -> None:
        beats = 0
        last_seen: dict[int, tuple[int, float]] = {}
        lost_since: float | None = None
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            try:
                beats += 1
                store.set(f"vseg/alive/{self._rank}", str(beats))
                if not self._posted and store.check([FAILED_KEY]):
                    self._exit(store.get(FAILED_KEY).decode())
                for r in range(self._world):
                    if r == self._rank or not store.check([f"vseg/alive/{r}"]):
                        continue
                    count = int(store.get(f"vseg/alive/{r}"))
                    seen = last_seen.get(r)
                    if seen is None or seen[0] != count:
                        last_seen[r] = (count, now)
                    elif now - seen[1] > self.heartbeat_timeout_s and not self._stop.is_set():
                        self._exit(f"rank {r} sent no heartbeat for {now - seen[1]:.0f} s (killed or hung hard)")
                lost_since = None
            except Exception as err:  # noqa: BLE001 - the store lives in rank 0: losing it means rank 0 is gone
                if self._stop.is_set():
                    return
                lost_since = lost_since or now
                if now - lost_since > min(self.heartbeat_timeout_s, 10.0):
                    self._exit(f"the rendezvous store (rank 0) is unreachable: {err}")
