"""Test-only fault injection: a Lightning callback that breaks a real training run on purpose.

These environment variables exist so that tests can drive a real `train.py` in a subprocess. Nothing reads
them unless they are set, no production setting does, and `vseg.training.run` attaches `FaultInjection`
only when one of them is set; the LightningModule knows nothing about them:

    VSEG_TEST_NAN_LOSS_STEPS="3,4:1"    the loss of every micro-batch of step 3, and of micro-batch 1 of
                                        step 4's accumulation window, becomes NaN (the model's mask
                                        logits are made NaN for those micro-batches)
    VSEG_TEST_NAN_GRAD_STEPS="5"        one trainable gradient becomes NaN at these steps (loss stays finite)
    VSEG_TEST_NAN_WEIGHTS_STEP="2"      a trainable weight becomes NaN after the optimizer step of this step
                                        (only when that step is applied, as a real overflow would)
    VSEG_TEST_RAISE_AT="2:1"            rank 1 raises RuntimeError as step 2 starts ("2" = every rank)
    VSEG_TEST_CHECKPOINT_DELAY_S="30"   a checkpoint write pauses this long before it is committed
    VSEG_TEST_SIGNAL_AT="3:SIGTERM"     the process sends itself this signal as step 3 starts
    VSEG_TEST_TRACE="trace.jsonl"       one JSON line per micro-batch once it has run: step, rank, pid, sample
                                        ids, loss (as Lightning backpropagates it: training_step's loss
                                        divided by accumulate_grad_batches)

("step" is Lightning's global step while the micro-batch runs: 0 for the first optimizer step.)
The out-of-memory injection (VSEG_TEST_OOM_AT) belongs to the OOM guard: `vseg.planner.guard`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch.utils.hooks import RemovableHandle


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
        """Whether any injection (or the trace) is asked for: only then is `FaultInjection` attached."""
        return bool(
            self.nan_loss_steps
            or self.nan_grad_steps
            or self.nan_weights_step is not None
            or self.raise_at
            or self.checkpoint_delay_s
            or self.signal_at
            or self.trace
        )

    def nan_loss_at(self, step: int, micro: int) -> bool:
        return (step, None) in self.nan_loss_steps or (step, micro) in self.nan_loss_steps


class FaultInjection(Callback):
    """Applies `TestFaults` to a run from outside the LightningModule, through Lightning's hooks.

    Where each fault enters, chosen so that the module and its guard meet it as they would a real one:
    raise / signal as a step starts (`on_train_batch_start`); NaN loss through a forward hook on the
    model that makes its mask logits NaN in the chosen training micro-batches (the module then computes
    a NaN loss, and its `NonFiniteGuard` sees it before backward); NaN gradient after backward
    (`on_after_backward`, before the guard checks the window's gradients); NaN weight through a
    post-step hook on the optimizer (so a skipped step injects nothing); the trace after each micro-batch
    (`on_train_batch_end`, before the run checkpoint of a finished step is written: put this callback
    ahead of `RunCheckpoint`).

    Args:
        faults: what to inject (`TestFaults.from_env()`).
    """

    def __init__(self, faults: TestFaults):
        self.faults = faults
        self._step = 0  # global step of the micro-batch in flight
        self._micro = 0  # its position in the accumulation window
        self._handles: list[RemovableHandle] = []

    # ------------------------------------------------------------ set-up
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Here the model exists under every strategy (ZeRO-3 builds it in configure_model) and so do the optimizers.
        self._remove_hooks()
        if self.faults.nan_loss_steps:
            self._handles.append(pl_module.model.register_forward_hook(self._nan_mask_logits(trainer)))
        if self.faults.nan_weights_step is not None and not isinstance(trainer.strategy, DeepSpeedStrategy):
            # DeepSpeed steps its own optimizer wrapper: no weight injection there (as before the move).
            for optimizer in trainer.optimizers:
                self._handles.append(optimizer.register_step_post_hook(self._nan_weight(trainer, pl_module)))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------ injections
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, rank = trainer.global_step, trainer.global_rank
        self._step, self._micro = step, batch_idx % max(trainer.accumulate_grad_batches, 1)
        raise_at, signal_at = self.faults.raise_at, self.faults.signal_at
        if raise_at and raise_at[0] == step and raise_at[1] in (None, rank):
            raise RuntimeError(f"VSEG_TEST_RAISE_AT: injected failure on rank {rank} at step {step}")
        if signal_at and signal_at[0] == step:
            self.faults.signal_at = None  # once
            os.kill(os.getpid(), getattr(signal, signal_at[1]))

    def _nan_mask_logits(self, trainer: L.Trainer) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if trainer.training and self.faults.nan_loss_at(self._step, self._micro):
                return dataclasses.replace(output, mask_logits=output.mask_logits * float("nan"))
            return None

        return hook

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._step not in self.faults.nan_grad_steps or isinstance(trainer.strategy, DeepSpeedStrategy):
            return  # DeepSpeed keeps gradients in its own buffers: no gradient injection there (as before)
        for p in pl_module.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.view(-1)[0] = float("nan")
                return

    def _nan_weight(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Any:
        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if trainer.global_step == self.faults.nan_weights_step:  # the step being applied
                with torch.no_grad():
                    next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("nan")

        return hook

    # ------------------------------------------------------------ trace
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.faults.trace is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        line = {
            "step": self._step,
            "rank": trainer.global_rank,
            "pid": os.getpid(),
            "ids": [str(i) for i in batch["ids"]],
            "loss": float(loss) if loss is not None else None,
        }
        with open(self.faults.trace, "a") as f:
            f.write(json.dumps(line) + "\n")
