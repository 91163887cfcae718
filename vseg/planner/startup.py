"""What training does with the plan before it starts: batch split, `strategy=auto`, the GPU report.

`prepare_run(cfg)` is called once per process at the top of `vseg.training.run.run`:

1. `data.global_batch_size` is split into `data.batch_size` x `trainer.accumulate_grad_batches` for the
   run's device count (the given batch_size is the largest micro-batch allowed).
2. `strategy=auto` becomes a real strategy: without CUDA `single` (one process) or `ddp` (several); with
   GPUs the plan's recommendation for the smallest free memory of the used GPUs (or `plan.gpu_memory`),
   at its micro-batch and accumulation. Rank 0 decides; Lightning's worker processes inherit the decision
   through VSEG_AUTO_STRATEGY so every rank runs the same setting.
3. On GPUs, rank 0 prints the GPU report (name, total, free per device) and the estimate for the chosen
   setting, and warns when it exceeds a used GPU's free memory.

`check_sam_cache(cfg, images)` runs once the training images are known: the SAM-2 feature cache grows to one
entry per training image, which must fit next to the estimate (`gpu`) or in host memory (`cpu`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from vseg.config import ConfigError, ModelConfig, TrainConfig
from vseg.model.build import DTYPES, sam2_config
from vseg.planner.facts import model_facts, sequence_facts
from vseg.planner.gpus import GpuInfo, gpu_inventory, parse_memory
from vseg.planner.guard import register
from vseg.planner.memory import GB, Estimate, Setting, estimate
from vseg.planner.plan import Plan, describe, make_plan, render, split_global_batch, with_setting, world_size

log = logging.getLogger(__name__)

AUTO_ENV = "VSEG_AUTO_STRATEGY"  # "<config key>=strategy:micro:accumulate", set by rank 0 for worker processes


def _rank_zero() -> bool:
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def _uses_cuda(cfg: TrainConfig, gpus: list[GpuInfo]) -> bool:
    return bool(gpus) and str(cfg.trainer.get("accelerator", "auto")) not in ("cpu", "mps")


def resolve_global_batch(cfg: TrainConfig, world: int) -> TrainConfig:
    """`data.global_batch_size` -> per-device micro-batch x accumulation (unchanged config when unset)."""
    wanted = cfg.data.global_batch_size
    if wanted is None:
        return cfg
    micro, accumulate, effective = split_global_batch(wanted, world, cfg.data.batch_size)
    note = "" if effective == wanted else f" ({wanted} is not divisible by {world} devices: effective {effective})"
    if _rank_zero():
        log.info(
            "data.global_batch_size=%d over %d device(s): micro-batch %d x accumulation %d per device%s",
            wanted,
            world,
            micro,
            accumulate,
            note,
        )
    trainer = dict(cfg.trainer)
    trainer["accumulate_grad_batches"] = accumulate
    return replace(cfg, data=replace(cfg.data, batch_size=micro), trainer=trainer)


def resolve_auto(
    cfg: TrainConfig, devices: int, capacity: float | None, plan: Plan | None = None, cuda: bool = True
) -> tuple[TrainConfig, str]:
    """`strategy=auto` -> the plan's choice; returns the new config and a sentence saying what and why.

    Raises:
        ConfigError: with the plan table, when no strategy fits.
    """
    if not cuda:
        name = "single" if devices == 1 else "ddp"
        return with_setting(cfg, name, cfg.data.batch_size, int(cfg.trainer.get("accumulate_grad_batches", 1))), (
            f"strategy=auto -> {name}: no CUDA GPU, {devices} process(es) on the CPU"
        )
    plan = plan or make_plan(cfg, devices, capacity)
    rec = plan.recommended
    if rec is None or rec.best is None:
        raise ConfigError("strategy=auto: nothing fits these GPUs\n" + render(plan))
    s = rec.best.setting
    faster = [r for r in plan.rows[: plan.rows.index(rec)] if r.status != "n/a"]
    cap = f"{capacity / GB:.1f} GB" if capacity is not None else "unknown memory"
    notes = [
        f"{r.strategy} does not fit ({r.requested.total / GB:.1f} GB)"
        if r.best is None
        else f"{r.strategy} only at micro-batch {r.best.setting.micro_batch}"
        for r in faster
    ]
    why = (
        f"strategy=auto -> {rec.strategy}, micro-batch {s.micro_batch} x accumulation {s.accumulate} on {devices} "
        f"GPU(s): the fastest that fits {cap} per GPU, {describe(rec.best)}"
        + (f"; {'; '.join(notes)}" if notes else "")
    )
    return with_setting(cfg, rec.strategy, s.micro_batch, s.accumulate), why


def gpu_report(gpus: list[GpuInfo], used: int) -> str:
    """One line per GPU: index, name, total and free memory; the used ones marked."""
    lines = [f"GPUs: {len(gpus)} visible, this run uses {min(used, len(gpus))} per node"]
    for g in gpus:
        mark = "*" if g.index < used else " "
        lines.append(f" {mark}{g.index:>2}  {g.name:<32} total {g.total / GB:6.1f} GB  free {g.free / GB:6.1f} GB")
    return "\n".join(lines)


def _capacity(cfg: TrainConfig, gpus: list[GpuInfo], devices: int) -> float | None:
    if cfg.plan.gpu_memory:
        return parse_memory(cfg.plan.gpu_memory, "plan.gpu_memory")
    used = gpus[: max(1, min(devices, len(gpus)))]
    # Rounded down to 0.5 GB so that ranks started together (torchrun) read the same number.
    return min(int(g.free / (GB / 2)) * (GB / 2) for g in used) if used else None


def _per_node(cfg: TrainConfig, devices: int) -> int:
    """Processes (GPUs) of the run on one node."""
    return max(devices // max(int(cfg.trainer.get("num_nodes", 1) or 1), 1), 1)


_ESTIMATES: dict[tuple[str, int], Estimate] = {}


def _configured_estimate(cfg: TrainConfig, devices: int) -> Estimate:
    """The estimate of the configured setting (one meta build per config, shared by the start-up checks)."""
    key = (repr(cfg), devices)
    if key not in _ESTIMATES:
        f, model, tokenizer = model_facts(cfg)
        setting = Setting(
            cfg.strategy.name,
            devices,
            cfg.data.batch_size,
            int(cfg.trainer.get("accumulate_grad_batches", 1)),
            cfg.model.gradient_checkpointing,
            str(cfg.trainer.get("precision", "bf16-mixed")),
        )
        _ESTIMATES[key] = estimate(f, sequence_facts(cfg, model, tokenizer), setting)
    return _ESTIMATES[key]


def sam_cache_bytes(model_cfg: ModelConfig, images: int) -> float:
    """What `model.sam_feature_cache` holds for `images` distinct images: the three FPN maps each one keeps,
    in the model's dtype (~45 MB per 1024-px image for SAM-2 Hiera-L in bf16)."""
    vision = sam2_config(model_cfg.sam2).vision_config
    pixels = sum(int(h) * int(w) for h, w in vision.backbone_feature_sizes)
    element = DTYPES[model_cfg.dtype].itemsize
    return float(images) * vision.fpn_hidden_size * pixels * element


def host_available() -> float | None:
    """Host memory available for new allocations (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_sam_cache(cfg: TrainConfig, images: int) -> float:
    """Refuses a SAM-2 feature cache that cannot fit; returns its size in bytes (per process).

    `gpu`: the cache plus the planner's estimate of the configured setting must fit the smallest free memory
    of the used GPUs (or `plan.gpu_memory`). `cpu`: every process of a node holds its own cache in pinned
    host memory; together they must stay under 80 % of the available host memory.
    """
    where = cfg.model.sam_feature_cache
    if where == "none":
        return 0.0
    need = sam_cache_bytes(cfg.model, images)
    gpus = gpu_inventory() if cfg.trainer.get("accelerator") not in ("cpu", "mps") else []
    devices = world_size(cfg, len(gpus))
    per_node = _per_node(cfg, devices)
    size = f"{images} training images x {need / max(images, 1) / 2**20:.0f} MB = {need / GB:.1f} GB"
    if where == "gpu" and (_uses_cuda(cfg, gpus) or cfg.plan.gpu_memory):
        capacity = _capacity(cfg, gpus, per_node)
        if capacity is not None:
            training = _configured_estimate(cfg, devices).total
            if training + need > capacity:
                raise ConfigError(
                    f"model.sam_feature_cache=gpu: the cache grows to {size} on each GPU; with the training "
                    f"estimate ({training / GB:.1f} GB) that exceeds the {capacity / GB:.1f} GB available. Use "
                    "model.sam_feature_cache=cpu (pinned host memory) or none"
                )
    if where == "cpu":
        host = host_available()
        if host is not None and need * per_node > 0.8 * host:
            raise ConfigError(
                f"model.sam_feature_cache=cpu: {per_node} process(es) on this node would each hold {size} of host "
                f"memory, more than 80 % of the {host / GB:.1f} GB available. Use model.sam_feature_cache=none"
            )
    if _rank_zero():
        log.info("SAM-2 feature cache (%s): up to %s per process", where, size)
    return need


def prepare_run(cfg: TrainConfig) -> TrainConfig:
    """Splits the global batch, resolves `strategy=auto`, prints the GPU report; returns the config to run."""
    auto = cfg.strategy.name == "auto"
    gpus = (
        gpu_inventory() if (auto or cfg.strategy.gpu_only or cfg.trainer.get("accelerator") in ("gpu", "cuda")) else []
    )
    cuda = _uses_cuda(cfg, gpus)
    devices = world_size(cfg, len(gpus))
    cfg = resolve_global_batch(cfg, devices)
    per_node = _per_node(cfg, devices)
    capacity = _capacity(cfg, gpus, per_node) if (cuda or cfg.plan.gpu_memory) else None
    chosen = None
    if auto:
        # The same command line gives the same key: a worker process takes rank 0's decision.
        key = f"{cfg.model.name}/{devices}/{cfg.data.batch_size}/{cfg.trainer.get('accumulate_grad_batches', 1)}"
        key += f"/{cfg.plan.gpu_memory}/{cuda}"
        inherited_key, _, inherited = os.environ.get(AUTO_ENV, "").partition("=")
        if inherited and inherited_key == key:
            name, micro, accumulate = inherited.split(":")
            cfg = with_setting(cfg, name, int(micro), int(accumulate))
        else:
            plan = make_plan(cfg, devices, capacity) if cuda else None
            cfg, why = resolve_auto(cfg, devices, capacity, plan=plan, cuda=cuda)
            choice = f"{cfg.strategy.name}:{cfg.data.batch_size}:{cfg.trainer['accumulate_grad_batches']}"
            os.environ[AUTO_ENV] = f"{key}={choice}"
            if _rank_zero():
                print(f"vseg: {why}", flush=True)
            if plan is not None:
                chosen = plan.row(cfg.strategy.name).best
    register(cfg, capacity)
    if cuda and _rank_zero():
        lines = [gpu_report(gpus, per_node)]
        if chosen is None:
            chosen = _configured_estimate(cfg, devices)
        s = chosen.setting
        lines.append(
            f"plan: strategy={s.strategy}, micro-batch {s.micro_batch} x accumulation {s.accumulate} x {devices} "
            f"process(es) = {s.effective_batch}: {describe(chosen)}"
        )
        short = [g for g in gpus[:per_node] if chosen.total > g.free]
        if short:
            lines.append(
                f"WARNING: the estimate {chosen.total / GB:.1f} GB exceeds the free memory of GPU "
                + ", ".join(f"{g.index} ({g.free / GB:.1f} GB)" for g in short)
                + ": expect out-of-memory; `vseg plan` with the same overrides shows what fits (or use strategy=auto)"
            )
        print("\n".join(lines), flush=True)
    return cfg
