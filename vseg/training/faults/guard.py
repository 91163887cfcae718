"""Bad numbers in training: NaN/Inf losses or gradients skip the optimizer step, too many in a row stop the run."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch.nn.utils import get_total_norm

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf too many steps in a row, or weights became non-finite."""


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
        self._pending: tuple[list[list[Any]], torch.Tensor, Any, int, int] | None = None  # `defer`'s, unreported

    def observe(self, loss: torch.Tensor, ids: list[Any]) -> None:
        """Records one micro-batch's loss (no device sync here)."""
        self._window.append((list(ids), ~torch.isfinite(loss.detach())))

    @staticmethod
    def grads_bad(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return None
        # The largest |gradient| over all tensors is finite exactly when every gradient is (NaN and inf carry
        # through a max, and unlike a 2-norm a max cannot overflow). torch's multi-tensor kernels compute it in a
        # few launches, where a check per tensor issues ~3 kernels for each of the ~500 LoRA tensors every step.
        return ~torch.isfinite(get_total_norm(grads, norm_type=float("inf"), foreach=None))

    def _flags(self, module: L.LightningModule, grads_bad: torch.Tensor | None) -> tuple[list[Any], torch.Tensor]:
        """(the window's ids per micro-batch, a device tensor [any loss bad, any gradient bad (all ranks), this
        rank's loss flag per micro-batch]); the window starts anew."""
        window, self._window = self._window, []
        device = module.device
        # made on the device: copying a host-made tensor there would wait for every kernel queued before it
        own = (
            torch.stack([flag.to(device) for _, flag in window])
            if window
            else torch.zeros(0, dtype=torch.bool, device=device)
        )
        grad = grads_bad if grads_bad is not None else torch.zeros((), dtype=torch.bool, device=device)
        flags = torch.stack([own.any(), grad.to(device)]).float()
        trainer = module._trainer
        if trainer is not None and trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="max")
        return [ids for ids, _ in window], torch.cat([flags, own.float()])

    def decide(self, module: L.LightningModule, grads_bad: torch.Tensor | None) -> bool:
        """True when the step must be skipped; reports it and raises after too many in a row. Reads the flags
        on the host: waits for the step's backward pass.

        Every rank calls this at the same optimizer step (the flags are all-reduced).
        """
        ids, flags = self._flags(module, grads_bad)
        trainer = module._trainer
        return self._report(ids, flags.tolist(), module.global_step, trainer.global_rank if trainer else 0)

    def defer(self, module: L.LightningModule, grads_bad: torch.Tensor | None) -> torch.Tensor:
        """The skip decision on the device, for an optimizer that skips itself (fused AdamW's `found_inf`): a
        float32 scalar, 1.0 when the step must be skipped. Nothing waits for it here; `settle` reports it
        (warnings, counts, the stop after too many in a row) once the step has run, one optimizer step later.
        """
        self.settle()
        ids, flags = self._flags(module, grads_bad)
        host = flags.to("cpu", non_blocking=True)  # pinned when copied from a GPU: the copy does not block
        done = torch.cuda.Event() if flags.is_cuda else None
        if done is not None:
            done.record()
        trainer = module._trainer
        self._pending = (ids, host, done, module.global_step, trainer.global_rank if trainer else 0)
        return flags[:2].max()

    def settle(self) -> None:
        """Reports the deferred decision of the last `defer`, if any (raises after too many bad steps)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            ids, host, done, step, rank = pending
            if done is not None:
                done.synchronize()
            self._report(ids, host.tolist(), step, rank)

    def _report(self, window_ids: list[list[Any]], flags: list[float], step: int, rank: int) -> bool:
        """Counts a step's outcome from its flags (`_flags`' layout); warns about a bad one; raises after too
        many in a row. True when the step was bad."""
        any_loss_bad, any_grad_bad = bool(flags[0]), bool(flags[1])
        if not (any_loss_bad or any_grad_bad):
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        local_bad_ids = [i for ids, flag in zip(window_ids, flags[2:], strict=True) if flag for i in ids]
        all_ids = [i for ids in window_ids for i in ids]
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
