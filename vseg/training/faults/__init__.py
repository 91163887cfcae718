"""Runs that survive: atomic checkpoints, resume, signals, bad-number guard, rank watchdog; test-only faults.

FAULTS.md tells the whole story and how each part is tested. One module per concern:

- `checkpointing`: `RunCheckpoint` (Lightning callback): step checkpoints every N optimizer steps, keep-last-K
  rotation, SIGINT / SIGTERM / SIGUSR1 turned into "finish this optimizer step, save on every rank, stop",
  the RNG state of every rank saved and restored, and no checkpoint ever written from non-finite weights
  (`save_checkpoint_atomic`). Which checkpoints are complete, the newest, rotation: `vseg.artifacts.checkpoints`.
- `guard`: `NonFiniteGuard`: the LightningModule asks it, before every optimizer step, whether any loss or
  gradient of the step's micro-batches was NaN/Inf on any rank; such steps are skipped and counted, and the
  run stops (`NonFiniteError`) after `faults.max_bad_steps` of them in a row.
- `watchdog`: `RankWatchdog` (Lightning callback): with several processes, a rank that raises posts its error
  to the rendezvous store and every other rank exits within seconds with one line naming it; a rank that
  vanishes (kill -9) is noticed by its missing heartbeat.
- `injection`: test-only `FaultInjection` (Lightning callback) driven by VSEG_TEST_* environment variables,
  attached by `vseg.training.run` only when one is set.
"""

from vseg.training.faults.checkpointing import RunCheckpoint, save_checkpoint_atomic
from vseg.training.faults.guard import NonFiniteError, NonFiniteGuard
from vseg.training.faults.injection import FaultInjection, TestFaults
from vseg.training.faults.watchdog import RankWatchdog

__all__ = [
    "FaultInjection",
    "NonFiniteError",
    "NonFiniteGuard",
    "RankWatchdog",
    "RunCheckpoint",
    "TestFaults",
    "save_checkpoint_atomic",
]
