"""Watching a run: per-GPU memory, throughput and FLOPs utilisation in TensorBoard (Lightning callback).

`PerfMonitor` logs, every `trainer.log_every_n_steps` optimizer steps:

* `perf/samples_per_s`, `perf/tokens_per_s` (all ranks together; tokens = attention-mask ones, image
  placeholders included), `perf/step_time_s` (seconds per optimizer step);
* `perf/input_wait_share`: the share of the window this process spent waiting for its batches (the loader
  stamps each batch with its wait, `vseg.data.datamodule`). A share above `INPUT_WAIT_WARN` in a timed window
  of a GPU run is said once on the console: the GPU then idles on the DataLoader's workers, not on the model;
* `perf/tflops_per_gpu`, `perf/mfu` and `perf/hfu` once FLOPs are known. FLOPs are *counted*, not guessed:
  on micro-batch `callbacks.flops_step` (off by default: -1; e.g. 2, after warm-up) the forward and the backward of that
  micro-batch run under `torch.utils.flop_counter.FlopCounterMode`, which adds up the FLOPs of every matmul,
  convolution and attention kernel actually dispatched. `hfu` (hardware) uses everything executed, the
  backward's recomputation under gradient checkpointing included; `mfu` (model) leaves that recomputation
  out: it subtracts the counted forward FLOPs of the checkpointed LLM decoder layers once. Peak: the GPU's
  dense bf16 tensor-core rate (table below; `callbacks.peak_tflops` overrides it);
* `memory/gpu<rank>/{allocated,reserved,peak_allocated,peak_reserved}_gb` for every rank (gathered),
  and `memory/cpu<rank>_rss_gb` (host memory of each process: offloaded optimizer states live there).

With `callbacks.perf_json=FILE` a summary (median throughput after warm-up, peaks per GPU, FLOPs) is
written at the end of training: bench/train.py reads it. `callbacks.memory_cap_gb=G` caps every process's
CUDA caching allocator at G GiB (`torch.cuda.set_per_process_memory_fraction`) before the model reaches
the GPU, to reproduce smaller cards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)

GIB = 1024**3
#: a timed window that waited this share of its time for inputs is loader-bound (warned once)
INPUT_WAIT_WARN = 0.2
# Dense bf16 tensor-core peak per GPU (TFLOP/s), from the vendors' data sheets (no sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100": 989.4,  # SXM; PCIe 756
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A6000": 154.8,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}


def peak_tflops(device_name: str) -> float | None:
    """The table's entry whose key is in the CUDA device name (longest match), or None."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in device_name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def _rss_gb() -> float:
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / GIB
    except ImportError:  # pragma: no cover - psutil ships with lightning's dependencies
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def checkpointed_layers(model: torch.nn.Module) -> set[str]:
    """Names (in `model`) of the LLM decoder layers that recompute their forward in backward.

    Only layers under a `language_model`: the vision tower's layers are checkpointed too, but they run
    without gradients, so nothing of theirs is recomputed.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    return {
        name
        for name, m in model.named_modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and "language_model" in name
    }


def flops_of(counts: dict[str, dict[Any, int]], names: set[str]) -> float:
    """FLOPs that FlopCounterMode attributed to the modules `names`.

    Its keys are paths from the outermost module that ran (`Sa2VA.mllm...layers.0`), the names are paths
    from the LightningModule (`model.mllm...layers.0`): they match when one path ends with the other's tail.
    """

    def hit(key: str) -> bool:
        tail = key.partition(".")[2]
        return bool(tail) and any(n == tail or n.endswith("." + tail) or tail.endswith("." + n) for n in names)

    return float(sum(sum(v.values()) for k, v in counts.items() if hit(k)))


def _sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Q.K^T and P.V of scaled-dot-product attention; unlike torch's formula it allows grouped-query
    attention (fewer key/value heads than query heads, SDPA's enable_gqa)."""
    *batch, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    lead = math.prod(batch)
    return 2 * lead * s_q * s_k * d + 2 * lead * s_q * s_k * d_v


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Backward of SDPA: four matmuls of the forward's sizes (dV, dP, dQ, dK), i.e. twice the forward."""
    return 2 * _sdpa_forward_flops(query_shape, key_shape, value_shape)


def _sdpa_formulas() -> dict[Any, Any]:
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    out: dict[Any, Any] = {}
    for name in names:
        if hasattr(aten, name):
            out[getattr(aten, name)] = _sdpa_forward_flops
        if hasattr(aten, name + "_backward"):
            out[getattr(aten, name + "_backward")] = _sdpa_backward_flops
    return out


class PerfMonitor(Callback):
    """Throughput, counted FLOPs / MFU and per-GPU memory, logged to the trainer's logger.

    Args:
        flops_step: the micro-batch (counted from 0 in this run) whose FLOPs are counted; < 0 disables it.
        peak_tflops: per-GPU peak for MFU; None = from the device name.
        perf_json: write a summary JSON here at the end of training (rank 0).
        memory_cap_gb: cap each process's CUDA allocator at this many GiB.
        warmup_steps: optimizer steps left out of the summary's throughput (with every window that holds one).
    """

    def __init__(
        self,
        flops_step: int = -1,
        peak_tflops: float | None = None,
        perf_json: str | None = None,
        memory_cap_gb: float | None = None,
        warmup_steps: int = 2,
    ):
        self.flops_step = flops_step
        self.peak = peak_tflops
        self.perf_json = perf_json
        self.memory_cap_gb = memory_cap_gb
        self.warmup_steps = warmup_steps
        self._micro = 0
        self._counter: Any = None
        self._phase = ""
        self.forward_flops = 0.0
        self.backward_flops = 0.0
        self.recompute_flops = 0.0
        self.flops_samples = 0
        self._window_start: float | None = None
        self._window = {"samples": 0, "tokens": 0, "steps": 0, "input_wait_s": 0.0}
        self._last_step = -1
        self._window_counted = False
        self._batch_size = 0
        # (step, samples/s, tokens/s, s/step, share of the window spent waiting for inputs)
        self.rates: list[tuple[int, float, float, float, float]] = []
        self._warned_inputs = False
        self.memory: list[dict[str, float]] = []

    @classmethod
    def from_config(cls, callbacks: dict[str, Any]) -> PerfMonitor:
        """From the run's `callbacks` config group (keys flops_step, peak_tflops, perf_json, memory_cap_gb)."""
        return cls(
            flops_step=int(callbacks.get("flops_step", -1)),
            peak_tflops=callbacks.get("peak_tflops"),
            perf_json=callbacks.get("perf_json"),
            memory_cap_gb=callbacks.get("memory_cap_gb"),
        )

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not torch.cuda.is_available() or trainer.strategy.root_device.type != "cuda":
            return
        device = trainer.strategy.root_device
        if self.memory_cap_gb:
            total = torch.cuda.get_device_properties(device).total_memory
            fraction = min(1.0, self.memory_cap_gb * GIB / total)
            torch.cuda.set_per_process_memory_fraction(fraction, device)
            log.info(
                "GPU %s: allocator capped at %.1f GiB (%.3f of %.1f GiB)",
                device,
                self.memory_cap_gb,
                fraction,
                total / GIB,
            )
        if self.peak is None:
            self.peak = peak_tflops(torch.cuda.get_device_name(device))
        torch.cuda.reset_peak_memory_stats(device)

    # ------------------------------------------------------------------------------------------ FLOPs
    def _start_count(self, phase: str) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._phase = phase
        self._counter = FlopCounterMode(display=False, custom_mapping=_sdpa_formulas())
        self._counter.__enter__()

    def _stop_count(self) -> dict[str, Any]:
        counter, self._counter = self._counter, None
        counter.__exit__(None, None, None)
        return counter.get_flop_counts()

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_start is None:
            self._sync(trainer)
            self._window_start = time.perf_counter()
        if self._micro == self.flops_step:
            self._start_count("forward")
            self._window_counted = True  # counting slows this step: its window is not a throughput sample

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self._counter is not None and self._phase == "forward":
            counts = self._stop_count()
            self.forward_flops = float(sum(counts.get("Global", {}).values()))
            self.recompute_flops = flops_of(counts, checkpointed_layers(pl_module))
            self._start_count("backward")

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counter is not None and self._phase == "backward":
            counts = self._stop_count()
            self.backward_flops = float(sum(counts.get("Global", {}).values()))
            self.flops_samples = self._batch_size
            # Measured on an H100 (4B, batch 8): under FlopCounterMode the counted micro-batch keeps the
            # activations gradient checkpointing would have dropped (peak 27.8 vs 15.4 GB). That step's peak
            # is an artefact of counting, so the peak statistics restart after it.
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.empty_cache()  # the allocator would keep that step's segments as "reserved"
                torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    @property
    def flops_per_sample(self) -> float | None:
        """Executed FLOPs per sample (forward + backward, recomputation included)."""
        if not self.flops_samples:
            return None
        return (self.forward_flops + self.backward_flops) / self.flops_samples

    @property
    def model_flops_per_sample(self) -> float | None:
        """FLOPs per sample without the gradient-checkpointing recomputation."""
        if not self.flops_samples:
            return None
        return (self.forward_flops + self.backward_flops - self.recompute_flops) / self.flops_samples

    # ------------------------------------------------------------------------------------- throughput
    @staticmethod
    def _sync(trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._counter is not None:  # a skipped backward: drop the count
            self._stop_count()
        self._batch_size = len(batch["ids"]) if isinstance(batch, dict) and "ids" in batch else 0
        self._window["samples"] += self._batch_size
        if isinstance(batch, dict):
            self._window["input_wait_s"] += float(batch.get("input_wait_s", 0.0))
        if isinstance(batch, dict) and "num_tokens" in batch:  # counted by the collate: no host sync
            self._window["tokens"] += int(batch["num_tokens"])
        elif isinstance(batch, dict) and "attention_mask" in batch:
            self._window["tokens"] += int(batch["attention_mask"].sum())
        self._micro += 1
        step = trainer.global_step
        if step == self._last_step:
            return  # still accumulating
        self._last_step = step
        self._window["steps"] += 1
        every = max(int(trainer.log_every_n_steps or 1), 1)
        if step % every:
            return
        self._sync(trainer)
        now = time.perf_counter()
        seconds = max(now - (self._window_start or now), 1e-9)
        world = trainer.world_size
        samples_s = self._window["samples"] * world / seconds
        tokens_s = self._window["tokens"] * world / seconds
        step_time = seconds / max(self._window["steps"], 1)
        waiting = min(self._window["input_wait_s"] / seconds, 1.0)
        metrics = {
            "perf/samples_per_s": samples_s,
            "perf/tokens_per_s": tokens_s,
            "perf/step_time_s": step_time,
            "perf/input_wait_share": waiting,
        }
        per_gpu = samples_s / world
        if self.flops_per_sample:
            metrics["perf/tflops_per_gpu"] = per_gpu * self.flops_per_sample / 1e12
            if self.peak:
                metrics["perf/hfu"] = metrics["perf/tflops_per_gpu"] / self.peak
                metrics["perf/mfu"] = per_gpu * (self.model_flops_per_sample or 0.0) / 1e12 / self.peak
        metrics.update(self._memory(trainer))
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        first = step - self._window["steps"] + 1  # the window's first optimizer step (counted from 1)
        if first > self.warmup_steps and not self._window_counted:
            self.rates.append((step, samples_s, tokens_s, step_time, waiting))
            self._warn_inputs(trainer, first, step, waiting)
        self._window_counted = False
        self._window = {"samples": 0, "tokens": 0, "steps": 0, "input_wait_s": 0.0}
        self._window_start = time.perf_counter()

    def _warn_inputs(self, trainer: L.Trainer, first: int, last: int, waiting: float) -> None:
        # on the CPU the loader and the model share the same cores: more workers there take from the step
        cpu = trainer.strategy.root_device.type == "cpu"
        if waiting < INPUT_WAIT_WARN or self._warned_inputs or not trainer.is_global_zero or cpu:
            return
        self._warned_inputs = True
        data = getattr(getattr(trainer, "datamodule", None), "cfg", None)
        workers = f" (now {data.num_workers})" if data is not None and hasattr(data, "num_workers") else ""
        cores = (os.cpu_count() or 1) // max(int(getattr(trainer, "num_devices", 1) or 1), 1)
        log.warning(
            "steps %d-%d waited for their inputs %.0f%% of the time: the DataLoader's workers are slower than the "
            "model. Raise data.num_workers%s, up to the %d CPU cores per GPU here; perf/input_wait_share in "
            "TensorBoard shows it over the run (said once)",
            first,
            last,
            100 * waiting,
            workers,
            cores,
        )

    def _memory(self, trainer: L.Trainer) -> dict[str, float]:
        """Every rank's memory (one all-gather of a 5-vector); rank r's values under memory/gpu<r>/..."""
        device = trainer.strategy.root_device
        if device.type == "cuda":
            stats = [
                torch.cuda.memory_allocated(device),
                torch.cuda.memory_reserved(device),
                torch.cuda.max_memory_allocated(device),
                torch.cuda.max_memory_reserved(device),
            ]
        else:
            stats = [0.0, 0.0, 0.0, 0.0]
        local = torch.tensor([s / GIB for s in stats] + [_rss_gb()], dtype=torch.float64)
        if trainer.world_size > 1:  # one all-gather on the device; alone, the numbers never leave the host
            local = trainer.strategy.all_gather(local.to(device))
        gathered = local.reshape(-1, 5).cpu()
        out: dict[str, float] = {}
        names = ("allocated_gb", "reserved_gb", "peak_allocated_gb", "peak_reserved_gb")
        for rank, row in enumerate(gathered.tolist()):
            if device.type == "cuda":
                out.update({f"memory/gpu{rank}/{n}": v for n, v in zip(names, row[:4], strict=True)})
            out[f"memory/cpu{rank}_rss_gb"] = row[4]
        self.memory.append(out)
        return out

    # ------------------------------------------------------------------------------------------ summary
    def summary(self, trainer: L.Trainer) -> dict[str, Any]:
        """Median throughput after warm-up, peak memory per GPU (max over the run) and the FLOPs count."""
        world = trainer.world_size
        rates = self.rates or []
        med = (lambda i: statistics.median(r[i] for r in rates)) if rates else (lambda i: None)
        peaks: dict[str, list[float]] = {}
        for key in ("peak_allocated_gb", "peak_reserved_gb"):
            peaks[key] = [
                max((m.get(f"memory/gpu{r}/{key}", 0.0) for m in self.memory), default=0.0) for r in range(world)
            ]
        cpu = [max((m.get(f"memory/cpu{r}_rss_gb", 0.0) for m in self.memory), default=0.0) for r in range(world)]
        samples_s = med(1)
        out = {
            "samples_per_s": samples_s,
            "tokens_per_s": med(2),
            "step_time_s": med(3),
            "steps_measured": len(rates),
            "window_samples_per_s": [round(r[1], 3) for r in rates],  # each timed window: the median's spread
            "input_wait_share": med(4),
            "window_input_wait_share": [round(r[4], 3) for r in rates],
            "world_size": world,
            "peak_allocated_gb": peaks["peak_allocated_gb"],
            "peak_reserved_gb": peaks["peak_reserved_gb"],
            "cpu_rss_gb": cpu,
            "flops_per_sample": self.flops_per_sample,
            "model_flops_per_sample": self.model_flops_per_sample,
            "forward_flops_per_sample": self.forward_flops / self.flops_samples if self.flops_samples else None,
            "peak_tflops_per_gpu": self.peak,
        }
        if samples_s and self.peak and self.model_flops_per_sample:
            out["mfu"] = samples_s / world * self.model_flops_per_sample / 1e12 / self.peak
            out["hfu"] = samples_s / world * (self.flops_per_sample or 0.0) / 1e12 / self.peak
        return out

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.perf_json and trainer.is_global_zero:
            path = Path(self.perf_json)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.summary(trainer), indent=2))
