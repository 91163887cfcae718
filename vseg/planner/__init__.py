"""Memory planning: per-GPU estimates from a meta-device build, `vseg plan`, `strategy=auto`, the start-up GPU
report, `data.global_batch_size` splitting and the OOM guard (see each module's docstring)."""

from vseg.planner.guard import OOM_EXIT_CODE, OOMGuard, OutOfMemoryStop, exit_on_oom, oom_guard
from vseg.planner.startup import check_sam_cache, prepare_run

__all__ = [
    "OOM_EXIT_CODE",
    "OOMGuard",
    "OutOfMemoryStop",
    "check_sam_cache",
    "exit_on_oom",
    "oom_guard",
    "prepare_run",
]
