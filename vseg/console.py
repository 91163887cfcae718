"""What the console shows: each message once, and nothing from the libraries that a user cannot act on.

- `setup_console()` is called once by every front door (train.py, predict.py, the `vseg` tool), after the
  logging configuration (Hydra's `job_logging: stdout`) and before Lightning prints anything.
- `ProgressBar` and `ModelSummary` replace Lightning's own callbacks in `vseg.training.run.build_trainer`.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as _LightningModelSummary
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.model_summary import get_human_readable_count

log = logging.getLogger(__name__)

#: Messages Lightning logs that advertise its services; they say nothing about the run.
_ADVERTS = ("💡 Tip:",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_ADVERTS)


def setup_console() -> None:
    """Makes Lightning's log lines appear once and silences library warnings vseg cannot act on. Idempotent."""
    import lightning  # noqa: F401  (its __init__ adds the handler removed below; importing it first makes that certain)

    # The `lightning` package's __init__ gives its logger a stderr handler ("INFO: ...") and leaves it
    # propagating to the root logger, so with Hydra's root handler every Lightning line was printed twice.
    # When the root logger has a handler, it alone prints; without one (library use) Lightning's stays.
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_log.removeHandler(handler)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropAdverts())
    # vseg's LightningModule moves batches itself (speed.overlap_steps: a copy stream) and so overrides
    # `transfer_batch_to_device` next to a DataModule, which Lightning reports on every fit as if by mistake.
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds `LeafSpec()`, which
    # torch 2.13 deprecates; it runs inside every fit/predict loop and nothing vseg passes can avoid it.
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without `v_num`, reading the step's losses at most once a second.

    `v_num` is the logger's version; vseg's TensorBoard logger writes to `<run dir>/tensorboard` (version
    "tensorboard"), which the bar showed as `v_num=oard`. The run directory is printed instead.

    Reading a logged loss copies it from the GPU, which waits for every kernel queued before it: done after
    every training step, the host could never start a step while the GPU still ran the one before
    (`speed.overlap_steps`). The count still moves with every step.
    """

    METRICS_EVERY_S = 1.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._metrics_read = -float("inf")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is None or not self._should_update(n, bar.total):
            return
        if not bar.disable:
            bar.n = n
            bar.refresh()
        now = time.monotonic()
        if now - self._metrics_read >= self.METRICS_EVERY_S or n == bar.total:
            self._metrics_read = now
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics


class ModelSummary(_LightningModelSummary):
    """Lightning's module table (`trainer.enable_model_summary=true`) without its FLOPs column and total.

    Lightning counts FLOPs only for a model with an `example_input_array`; Sa2VA's inputs are a batch dict,
    so the summary always said "Total FLOPs: 0". (Training FLOPs and MFU: `callbacks.flops_step`.)
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name in ("Name", "Type", "Params")]
        widths = [max(len(name), *(len(v) for v in values)) for name, values in columns]
        rows = [[name for name, _ in columns], *zip(*(values for _, values in columns), strict=True)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines += [
            f"trainable {get_human_readable_count(trainable_parameters)}, "
            f"frozen {get_human_readable_count(total_parameters - trainable_parameters)}, "
            f"total {get_human_readable_count(total_parameters)} ({model_size:.1f} MB)"
        ]
        log.info("modules:\n%s", "\n".join(lines))
