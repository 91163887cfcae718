"""Loader worker processes that end with the process that started them, however it ends.

A DataLoader worker notices a dead parent only when it next looks (torch polls every few seconds between
batches), and one busy decoding or blocked on a full pipe can outlive a `kill -9`ed `predict.py` or
`train.py` by minutes, holding its memory. `WorkerInit` asks the kernel to SIGKILL the worker the moment
its parent dies (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere nothing is asked) and exits at once when the
parent is already gone by then. Every DataLoader of training and prediction uses it.

The kernel ties the signal to the parent *thread*: the loaders are iterated on the main thread, so the
workers live exactly as long as the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists and has not exited (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def die_with_parent(parent: int) -> None:
    """In a child process: be killed when `parent` dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        # Without a libc prctl (an unusual libc) the parent check below still runs.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    # The parent may have died before prctl took effect. A child of a forkserver has another parent, so a
    # different parent pid alone proves nothing: the process that made the loader must be gone too.
    if os.getppid() != parent and not process_alive(parent):
        os._exit(1)


class WorkerInit:
    """A DataLoader `worker_init_fn`: the worker dies with the process that built the loader, then `then`
    runs (the loader's own init function). Picklable, for the spawn and forkserver start methods.

    Setting any `worker_init_fn` stops Lightning from adding its worker seeding (`seed_everything(...,
    workers=True)`), so without `then` that seeding runs here when Lightning asked for it.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.parent = os.getpid()
        self.then = then

    def __call__(self, worker_id: int) -> None:
        die_with_parent(self.parent)
        if self.then is not None:
            self.then(worker_id)
        elif int(os.environ.get("PL_SEED_WORKERS", "0")):
            from lightning.fabric.utilities.seed import pl_worker_init_function

            pl_worker_init_function(worker_id)
