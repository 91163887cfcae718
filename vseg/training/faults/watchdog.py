"""Several processes, one fate: a rank that raises or dies stops every other rank promptly, shown once."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vseg.artifacts.files import StorageError
from vseg.planner.guard import OOM_EXIT_CODE, explain, is_oom

log = logging.getLogger(__name__)

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
