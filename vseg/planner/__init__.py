"""Memory planning: per-GPU estimates from a meta-device build, `vseg plan`, `strategy=auto`, the start-up GPU
report, `data.global_batch_size` splitting and the OOM guard (see each module's docstring).

- `facts`       parameter counts, layer shapes and sequence length read off a meta-device build
- `memory`      the per-GPU estimate of one setting (weights, gradients, optimizer, activations, buffers)
- `gpus`        the visible GPUs and their memory (NVML, nvidia-smi, torch); sizes like `24GB`
- `plan`        every strategy x micro-batch, the recommendation, `vseg plan`, `strategy=auto`
- `startup`     the start-up GPU report and the checks before a run
- `guard`       out-of-memory advice and exit code
- `disk`, `calibration`  the feature cache's disk size; measured peaks the estimate is checked against
"""

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
