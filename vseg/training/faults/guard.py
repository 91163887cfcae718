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
