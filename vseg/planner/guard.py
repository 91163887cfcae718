"""OOM guard: an out-of-memory error anywhere ends the run with what happened and what to do, never a bare trace.

- `OOMGuard` (Lightning callback, first in the list) tracks the phase (set-up, training, validation) and
  the step; when an exception reaches Lightning it records, for an OOM, this process's GPU memory at that
  moment (before teardown frees it). Lightning saves nothing on an exception, so the last good checkpoint
  stays as it was; the rank watchdog (vseg/training/faults/watchdog.py) then stops every other rank.
- `exit_on_oom()` (around `train.py`'s run) turns the OOM into the message: phase, step, rank, per-GPU
  memory at failure, the plan's estimate for the failed setting and ranked advice with the planner's numbers
  ("strategy=zero3: est. 13.1 GB/GPU"), and exits with status 4.
- `oom_guard("prediction", ...)` is the same for code outside Lightning (predict.py): it raises
  `OutOfMemoryStop` carrying the message (advice: smaller prediction batches, with estimates), which
  `exit_on_oom()` prints.

Test-only injection, inert unless set: VSEG_TEST_OOM_AT="setup" | "train:STEP[:RANK]" | "val:STEP[:RANK]"
raises torch.OutOfMemoryError at that point (training: after the forward of the step's first micro-batch,
inside the step; validation: at the validation batch of that global step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vseg.config import TrainConfig
from vseg.planner.facts import model_facts, sequence_facts
from vseg.planner.memory import GB, Setting, estimate, estimate_inference
from vseg.planner.plan import make_plan, world_size

log = logging.getLogger(__name__)

OOM_EXIT_CODE = 4
TEST_OOM_ENV = "VSEG_TEST_OOM_AT"


class OutOfMemoryStop(RuntimeError):
    """An out-of-memory failure turned into its explanation and advice (`str(err)` is the message)."""


@dataclass
class _State:
    cfg: TrainConfig | None = None
    capacity: float | None = None  # bytes per GPU the plan uses (plan.gpu_memory or measured)
    phase: str = "set-up"
    step: int | None = None
    rank: int = 0
    memory: list[str] = field(default_factory=list)  # memory lines captured at the failure


STATE = _State()


def register(cfg: TrainConfig, capacity: float | None) -> None:
    """Called by `prepare_run`: the config and capacity the advice is computed for; phase back to set-up."""
    STATE.cfg, STATE.capacity = cfg, capacity
    STATE.phase, STATE.step, STATE.memory = "set-up", None, []


def is_oom(err: BaseException) -> bool:
    """torch's OutOfMemoryError, or a RuntimeError that says CUDA/HIP ran out of memory (older raisers)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and "out of memory" in text and ("cuda" in text or "hip" in text)


def memory_lines() -> list[str]:
    """This process's GPU memory now: allocated, peak, reserved, free/total per device it touched."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return ["no CUDA memory statistics (this process ran on the CPU)"]
    lines = []
    for i in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(i) == 0 and i != torch.cuda.current_device():
            continue
        free, total = torch.cuda.mem_get_info(i)
        lines.append(
            f"GPU {i}: {torch.cuda.memory_allocated(i) / GB:.1f} GB allocated (peak "
            f"{torch.cuda.max_memory_allocated(i) / GB:.1f}), {torch.cuda.memory_reserved(i) / GB:.1f} GB reserved, "
            f"{free / GB:.1f} GB free of {total / GB:.1f} GB"
        )
    return lines


def _capacity(registered: bool = True) -> float | None:
    """Bytes per GPU the advice assumes: the training run's plan (`register`), else the current GPU's total.

    Prediction passes `registered=False`: a training run registered earlier in the same process (a notebook,
    a test session) planned for its own budget, which says nothing about the GPU prediction now runs on.
    """
    if registered and STATE.capacity is not None:
        return STATE.capacity
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def training_advice(cfg: TrainConfig, capacity: float | None, limit: int = 5) -> list[str]:
    """Ranked, concrete changes with the planner's estimates: the fastest settings that fit first."""
    devices = world_size(cfg)
    if cfg.strategy.name == "single":
        devices = 1
    plan = make_plan(cfg, devices, capacity)
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    precision = str(cfg.trainer.get("precision", "bf16-mixed"))
    current = Setting(
        cfg.strategy.name, devices, cfg.data.batch_size, accumulate, cfg.model.gradient_checkpointing, precision
    )
    now = estimate(plan.facts, plan.seq, current)
    cap = f"{capacity / GB:.1f} GB" if capacity is not None else "an unknown amount"
    lines = [f"the plan estimates {now.total / GB:.1f} GB/GPU for this setting; the GPU has {cap}"]
    options: list[str] = []
    if not cfg.model.gradient_checkpointing:
        ck = estimate(plan.facts, plan.seq, replace(current, grad_ckpt=True))
        if ck.total < 0.95 * now.total and (capacity is None or ck.total <= capacity):
            options.append(f"model.gradient_checkpointing=true: est. {ck.total / GB:.1f} GB/GPU")
    for row in plan.rows:
        if row.status in ("yes", "tight") and row.best is not None:
            s = row.best.setting
            change = [] if row.strategy == cfg.strategy.name else [f"strategy={row.strategy}"]
            if s.micro_batch != cfg.data.batch_size or s.accumulate != accumulate:
                change.append(f"data.batch_size={s.micro_batch} trainer.accumulate_grad_batches={s.accumulate}")
            if not change:
                continue
            mark = " (tight)" if row.status == "tight" else ""
            host = f" + {row.best.host / GB:.1f} GB host RAM" if row.best.host >= 0.05 * GB else ""
            options.append(f"{' '.join(change)}: est. {row.best.total / GB:.1f} GB/GPU{host}{mark}")
    if not options:
        smallest = min((r for r in plan.rows if r.status != "n/a"), key=lambda r: r.requested.total)
        options.append(
            f"nothing fits {cap}: the smallest is strategy={smallest.strategy} at "
            f"{smallest.requested.total / GB:.1f} GB/GPU; use more GPUs (trainer.devices) or smaller images "
            "(data.image_size, model.max_tiles)"
        )
    lines += [f"  {i}. {text}" for i, text in enumerate(options[:limit], 1)]
    return lines


def prediction_advice(cfg: TrainConfig, batch_size: int, capacity: float | None) -> list[str]:
    """Smaller prediction batches with their estimates (one GPU, weights as built)."""
    f, model, tokenizer = model_facts(cfg)
    seq = sequence_facts(cfg, model, tokenizer)
    now = estimate_inference(f, seq, batch_size)
    cap = f"{capacity / GB:.1f} GB" if capacity is not None else "an unknown amount"
    lines = [f"the plan estimates {now.total / GB:.1f} GB for batch_size={batch_size}; the GPU has {cap}"]
    b, options = batch_size // 2, []
    while b >= 1 and len(options) < 3:
        e = estimate_inference(f, seq, b)
        if capacity is None or e.total <= capacity:
            options.append(f"batch_size={b}: est. {e.total / GB:.1f} GB")
        b //= 2
    if not options:
        options.append(
            f"even batch_size=1 needs est. {estimate_inference(f, seq, 1).total / GB:.1f} GB: use a bigger GPU"
        )
    return lines + [f"  {i}. {text}" for i, text in enumerate(options, 1)]


def explain(
    err: BaseException, phase: str | None = None, step: int | None = None, advice: list[str] | None = None
) -> str:
    """The whole message for an OOM: where, memory at failure, estimate, ranked advice, checkpoint note."""
    phase = phase or STATE.phase
    step = STATE.step if step is None else step
    where = f"during {phase}" + (f" at step {step}" if step is not None else "")
    lines = [f"vseg: out of GPU memory {where} (rank {STATE.rank})", f"  {str(err).splitlines()[0][:300]}"]
    lines += [f"  {m}" for m in (STATE.memory or memory_lines())]
    if advice is None and STATE.cfg is not None:
        try:
            advice = training_advice(STATE.cfg, _capacity())
        except Exception as planning_error:  # noqa: BLE001 - the advice must never hide the OOM itself
            advice = [f"(no advice: planning failed: {planning_error})"]
    if advice:
        lines.append("what to do, fastest setting that fits first:" if phase != "prediction" else "what to do:")
        lines += [f"  {a}" if not a.startswith("  ") else a for a in advice]
    if STATE.cfg is not None and phase != "prediction":
        lines.append(
            "nothing was saved after the failure: the last good checkpoint is untouched "
            "(re-run the same command with a new setting; it resumes from there)"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def exit_on_oom() -> Iterator[None]:
    """Around an entry point: an OOM (or an OutOfMemoryStop) prints its explanation and exits with status 4."""
    try:
        yield
    except OutOfMemoryStop as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(OOM_EXIT_CODE)
    except Exception as err:  # noqa: BLE001 - only OOMs are handled, the rest re-raised untouched
        if not is_oom(err):
            raise
        print(explain(err), file=sys.stderr, flush=True)
        sys.exit(OOM_EXIT_CODE)


@contextlib.contextmanager
def oom_guard(
    phase: str = "prediction",
    cfg: TrainConfig | None = None,
    batch_size: int | None = None,
    step: Callable[[], int | None] | None = None,
) -> Iterator[None]:
    """Outside Lightning (e.g. predict.py's loop): an OOM inside becomes `OutOfMemoryStop` with advice.

    Args:
        phase: named in the message.
        cfg: the run's config (for the estimates); None gives the message without numbers.
        batch_size: the batch that failed (prediction advice halves it).
        step: returns the batch / step index at failure.
    """
    try:
        yield
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        index = step() if step is not None else None
        memory = memory_lines()
        advice = None
        if cfg is not None and batch_size is not None:
            try:
                advice = prediction_advice(cfg, batch_size, _capacity(registered=False))
            except Exception as planning_error:  # noqa: BLE001
                advice = [f"(no advice: planning failed: {planning_error})"]
        STATE.memory = memory
        raise OutOfMemoryStop(explain(err, phase, index, advice or [])) from None


# ---------------------------------------------------------------------------------------------- callback
def _injection() -> tuple[str, int | None, int | None] | None:
    raw = os.environ.get(TEST_OOM_ENV, "").strip()
    if not raw:
        return None
    phase, _, rest = raw.partition(":")
    step, _, rank = rest.partition(":")
    if phase not in ("setup", "train", "val"):
        raise ValueError(f"{TEST_OOM_ENV}={raw!r}: expected setup | train:STEP[:RANK] | val:STEP[:RANK]")
    return phase, int(step) if step else None, int(rank) if rank else None


def _injected(what: str) -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError(
        f"CUDA out of memory. Tried to allocate 2.00 GiB ({TEST_OOM_ENV}: injected during {what})"
    )


class OOMGuard(Callback):
    """Tracks phase and step for the OOM message and captures GPU memory at the failure."""

    def __init__(self) -> None:
        self.inject = _injection()

    def _fire(self, trainer: L.Trainer, phase: str) -> None:
        if self.inject and self.inject[0] == phase:
            _, step, rank = self.inject
            if (step is None or step == trainer.global_step) and rank in (None, trainer.global_rank):
                self.inject = None
                raise _injected(f"{STATE.phase} at step {trainer.global_step}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        STATE.phase, STATE.step, STATE.rank = "set-up", None, trainer.global_rank
        self._fire(trainer, "setup")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STATE.phase = "training"

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        STATE.phase, STATE.step = "training", trainer.global_step

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._fire(trainer, "train")  # inside the step: the forward's activations are alive

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STATE.phase = "validation (sanity check)" if trainer.sanity_checking else "validation"
        STATE.step = trainer.global_step

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._fire(trainer, "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STATE.phase = "training"

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        STATE.phase, STATE.step = "saving the final weights", trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if is_oom(exception):
            STATE.memory = memory_lines()  # before teardown frees anything
            log.error("rank %d: out of GPU memory during %s at step %s", trainer.global_rank, STATE.phase, STATE.step)
