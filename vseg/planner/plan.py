"""What fits, and how: the plan over every strategy and micro-batch, `vseg plan`, and `strategy=auto`.

`make_plan` estimates (vseg/planner/memory.py) each strategy at the configured micro-batch and searches,
per strategy, the largest micro-batch that fits while keeping the requested effective batch
(`data.global_batch_size`, else `data.batch_size` x `trainer.accumulate_grad_batches` x GPUs). The
recommendation is the fastest strategy that fits (ranked single > ddp > zero2 > zero2_offload > zero3 >
zero3_offload: for LoRA the trainable part is small, so offloading its optimizer costs less than ZeRO-3
gathering every frozen weight in forward, recompute and backward) at a micro-batch of at least
`SATURATING_MICRO` (smaller micro-batches leave the GPU idle: a faster strategy at micro-batch 1 loses to a
slightly slower one at 4), else the one with the largest micro-batch.

    vseg plan model=sa2va_8b trainer.devices=4 gpu_memory=24GB [cpu_memory=256GB] [any train override]

Without `gpu_memory`, the free memory of the GPUs this machine has is read (NVML, else nvidia-smi).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from omegaconf import OmegaConf

from vseg.config import ConfigError, TrainConfig, compose, validate
from vseg.planner.facts import ModelFacts, SequenceFacts, model_facts, sequence_facts
from vseg.planner.gpus import GpuInfo, gpu_inventory, parse_memory
from vseg.planner.memory import GB, PLANNED, Estimate, Setting, estimate, strategy_config

log = logging.getLogger(__name__)

SPEED_ORDER = PLANNED  # fastest first (see the module docstring)
SATURATING_MICRO = 4  # micro-batch from which a bigger one barely raises throughput (Sa2VA: ~300 tokens/sample)
MARGIN = 0.05  # "fits" leaves this share of the GPU free for estimate error; up to 100 % is "tight"


# ---------------------------------------------------------------------------------------------- inputs
def world_size(cfg: TrainConfig, gpus: int | None = None) -> int:
    """Processes of the run: `trainer.devices` (int, list, "0,1", "auto"/-1 = every visible GPU) x num_nodes."""
    devices = cfg.trainer.get("devices", "auto")
    nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, list | tuple):
        count = len(devices)
    elif isinstance(devices, str) and "," in devices:
        count = len([d for d in devices.split(",") if d.strip()])
    elif devices in ("auto", -1, "-1"):
        accelerator = str(cfg.trainer.get("accelerator", "auto"))
        count = (gpus if gpus is not None else len(gpu_inventory())) if accelerator != "cpu" else 1
    else:
        count = int(devices)
    return max(count, 1) * nodes


def split_global_batch(global_batch: int, world: int, max_micro: int) -> tuple[int, int, int]:
    """(micro-batch, accumulation, effective batch) for `global_batch` samples per optimizer step over `world`
    processes, with the micro-batch at most `max_micro` and a divisor of the per-device share.

    The per-device share is `global_batch / world` rounded to the nearest integer (at least 1): when the
    device count does not divide the batch, the effective batch differs and the caller says so.
    """
    if global_batch < 1 or world < 1 or max_micro < 1:
        raise ConfigError(f"global batch {global_batch}, {world} devices, micro-batch {max_micro}: all must be >= 1")
    share = max(1, int(global_batch / world + 0.5))
    micro = max(d for d in range(1, min(share, max_micro) + 1) if share % d == 0)
    return micro, share // micro, share * world


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class PlanRow:
    """One strategy: its estimate at the requested micro-batch and the largest micro-batch that fits."""

    strategy: str
    requested: Estimate
    best: Estimate | None  # None: no micro-batch fits
    status: str  # yes | tight | no | n/a
    why: str = ""


@dataclass
class Plan:
    """Every strategy for one model, GPU count, capacity and effective batch; the recommendation."""

    cfg: TrainConfig
    facts: ModelFacts
    seq: SequenceFacts
    devices: int
    capacity: float | None  # bytes per GPU (the smallest of the used GPUs), None = unknown
    capacity_source: str
    host_capacity: float | None
    global_batch: int  # effective batch asked for
    share: int  # samples per device per optimizer step
    requested_micro: int
    rows: list[PlanRow] = field(default_factory=list)
    gpus: list[GpuInfo] = field(default_factory=list)

    @property
    def recommended(self) -> PlanRow | None:
        """The fastest strategy that fits at a saturating micro-batch, else at the largest; "tight" ones last."""
        enough = min(SATURATING_MICRO, self.share)
        for wanted in ("yes", "tight"):
            rows = [r for r in self.rows if r.status == wanted and r.best is not None]
            if rows:
                return min(
                    rows, key=lambda r: (-min(r.best.setting.micro_batch, enough), SPEED_ORDER.index(r.strategy))
                )
        return None

    def row(self, strategy: str) -> PlanRow:
        return next(r for r in self.rows if r.strategy == strategy)


def _status(e: Estimate, capacity: float | None, host: float | None) -> str:
    if host is not None and e.host > host:
        return "no"
    if capacity is None:
        return "yes"
    if e.total <= capacity * (1 - MARGIN):
        return "yes"
    return "tight" if e.total <= capacity else "no"


def _applicable(strategy: str, devices: int) -> str:
    if strategy == "single" and devices > 1:
        return "one GPU only"
    if strategy in ("ddp", "zero2", "zero3") and devices == 1:
        return "no sharding on 1 GPU"
    return ""


def make_plan(
    cfg: TrainConfig,
    devices: int,
    capacity: float | None,
    host_capacity: float | None = None,
    facts: tuple[ModelFacts, SequenceFacts] | None = None,
    capacity_source: str = "gpu_memory",
) -> Plan:
    """Estimates every strategy for `cfg` on `devices` GPUs of `capacity` bytes each."""
    if facts is None:
        f, model, tokenizer = model_facts(cfg)
        seq = sequence_facts(cfg, model, tokenizer)
    else:
        f, seq = facts
    accumulate = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    requested = cfg.data.global_batch_size or cfg.data.batch_size * accumulate * devices
    micro, accum, _ = split_global_batch(requested, devices, cfg.data.batch_size)
    share = micro * accum
    precision = str(cfg.trainer.get("precision", "bf16-mixed"))
    ckpt = bool(cfg.model.gradient_checkpointing)
    plan = Plan(cfg, f, seq, devices, capacity, capacity_source, host_capacity, requested, share, micro)
    divisors = [d for d in range(share, 0, -1) if share % d == 0]
    for name in SPEED_ORDER:
        sc = strategy_config(name)
        n = 1 if name == "single" else devices
        at = estimate(f, seq, Setting(name, n, micro, accum, ckpt, precision), sc)
        candidates = [estimate(f, seq, Setting(name, n, d, share // d, ckpt, precision), sc) for d in divisors]
        statuses = [_status(e, capacity, host_capacity) for e in candidates]
        # The largest micro-batch that fits with the margin, else the largest that fits at all.
        best = next((e for e, st in zip(candidates, statuses, strict=True) if st == "yes"), None)
        best = best or next((e for e, st in zip(candidates, statuses, strict=True) if st == "tight"), None)
        why = _applicable(name, devices)
        status = "n/a" if why else (_status(best, capacity, host_capacity) if best else "no")
        plan.rows.append(PlanRow(name, at, best, status, why))
    return plan


def plan_for(cfg: TrainConfig, gpu_memory: str | None = None, cpu_memory: str | None = None) -> Plan:
    """The plan for a config on this machine: `gpu_memory` if given, else the smallest free memory of the
    GPUs the run will use."""
    gpus = gpu_inventory()
    devices = world_size(cfg, len(gpus))
    host = parse_memory(cpu_memory, "cpu_memory") if cpu_memory else None
    if gpu_memory:
        capacity, source = parse_memory(gpu_memory), f"gpu_memory={gpu_memory}"
    elif gpus:
        used = gpus[: min(devices, len(gpus))]
        capacity = min(g.free for g in used)
        source = f"free memory of GPU {', '.join(str(g.index) for g in used)} (smallest)"
    else:
        capacity, source = None, "no GPU visible and no gpu_memory=: fit not judged"
    plan = make_plan(cfg, devices, capacity, host, capacity_source=source)
    plan.gpus = gpus
    return plan


# ---------------------------------------------------------------------------------------------- output
def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _short(name: str) -> str:
    for wrapper in ("mllm.base_model.model.", "mllm.", ".token_adapter.base_layer", ".base_layer"):
        name = name.replace(wrapper, "" if wrapper.startswith(".") or wrapper.startswith("mllm") else wrapper)
    return name


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def command_for(plan: Plan, row: PlanRow) -> str:
    """The train.py overrides that run `row`'s best setting."""
    e = row.best or row.requested
    s = e.setting
    parts = [f"model={plan.cfg.model.name}", f"strategy={row.strategy}", f"trainer.devices={plan.devices}"]
    parts += [f"data.batch_size={s.micro_batch}", f"trainer.accumulate_grad_batches={s.accumulate}"]
    return "python train.py trainer=gpu " + " ".join(parts)


def render(plan: Plan) -> str:
    """The plan on one screen: model facts, a row per strategy, the answer and the command."""
    f, seq, cfg = plan.facts, plan.seq, plan.cfg
    cap = f"{_gb(plan.capacity)} GB" if plan.capacity is not None else "? GB"
    host = f", host RAM {_gb(plan.host_capacity)} GB" if plan.host_capacity is not None else ""
    first = plan.rows[0].requested.setting
    side = f"{seq.image_side} px" if seq.image_side else f"worst case, {cfg.model.max_tiles} tiles"
    lines = [
        f"vseg plan: {f.name} on {plan.devices} x {cap} GPUs ({plan.capacity_source}){host}",
        f"model: frozen {_human(f.frozen_params)} params ({_gb(f.frozen_bytes)} GB), trainable "
        f"{_human(f.trainable_params)} ({_gb(f.trainable_bytes)} GB fp32); largest layer "
        f"{_short(f.largest_layer[0]).rsplit('.', 1)[-1]} {_human(f.largest_layer[1])}, block {_human(f.largest_block[1])}",
        f"sample: {seq.image_tokens} image tokens ({seq.tiles} tile(s), {side}) + {seq.text_tokens} text = "
        f"{seq.length} tokens; vision tower {seq.vision_tokens} tokens; SAM-2 at {f.sam_image} px",
        f"batch: effective {plan.global_batch} = {plan.devices} GPU(s) x {plan.share} per GPU "
        f"(asked micro-batch {plan.requested_micro} x accumulation {plan.share // plan.requested_micro}); "
        f"grad ckpt {'on' if first.grad_ckpt else 'off'}, {first.precision}",
        "",
        f"per-GPU GB at micro-batch {plan.requested_micro} (buffer = CUDA context, buckets, gathered layers, "
        "fragmentation; host = RAM for offload)",
        f"{'strategy':<14}{'frozen':>7}{'train':>7}{'grads':>7}{'optim':>7}{'activ':>7}{'buffer':>7}"
        f"{'total':>8}{'host':>7}  {'fits':<5} largest micro-batch that fits",
    ]
    for row in plan.rows:
        e = row.requested
        c = e.split()
        best = row.best
        if row.status == "n/a":
            fit = f"({row.why})"
        elif best is None:
            fit = "none"
        else:
            s = best.setting
            fit = f"{s.micro_batch} x {s.accumulate} accum: {_gb(best.total)} GB"
        lines.append(
            f"{row.strategy:<14}{c['frozen']:>7.1f}{c['trainable']:>7.1f}{c['grads']:>7.1f}{c['optimizer']:>7.1f}"
            f"{c['activations']:>7.1f}{c['buffers']:>7.1f}{e.total / GB:>8.1f}{e.host / GB:>7.1f}  {row.status:<5} {fit}"
        )
    lines.append("")
    rec = plan.recommended
    if rec is None:
        smallest = min((r for r in plan.rows if r.status != "n/a"), key=lambda r: r.requested.total)
        lines.append(
            f"answer: NO - {f.name} does not fit {plan.devices} x {cap} with any strategy at micro-batch 1; "
            f"the smallest is {smallest.strategy} at {_gb(smallest.requested.total)} GB/GPU. More GPUs or memory, "
            "model.gradient_checkpointing=true, or a smaller model.max_tiles / data.image_size."
        )
    else:
        best = rec.best
        assert best is not None
        s = best.setting
        word = "yes" if rec.status == "yes" else "only just (tight)"
        if plan.capacity is None:
            word = "unknown (no GPU visible: pass gpu_memory=24GB to judge fits); without a limit"
        lines.append(
            f"answer: {word} - {f.name} fits {plan.devices} x {cap} with strategy={rec.strategy}, micro-batch "
            f"{s.micro_batch} x accumulation {s.accumulate} (effective {s.effective_batch}): est. "
            f"{_gb(best.total)} GB/GPU" + (f" + {_gb(best.host)} GB host RAM" if best.host >= 0.05 * GB else "")
        )
        lines.append(f"  {command_for(plan, rec)}")
    setup = max(r.requested.host_setup for r in plan.rows if r.status != "n/a")
    note = f"notes: start-up host RAM {_gb(setup)} GB (each rank builds the model on CPU first)"
    if plan.host_capacity is not None and setup > plan.host_capacity:
        note += " - MORE than cpu_memory: start fewer ranks or load a checkpoint (model.path: built on meta)"
    lines.append(note + f"; 'fits' keeps {int(MARGIN * 100)} % free; GB = GiB")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- command
def _split_args(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    own: dict[str, str] = {}
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key in ("gpu_memory", "cpu_memory", "plan.gpu_memory", "plan.cpu_memory"):
            own[key.removeprefix("plan.")] = value
        else:
            rest.append(item)
    return rest, own


def load_for_planning(overrides: list[str]) -> TrainConfig:
    """The train config `train.py trainer=gpu strategy=auto <overrides>` would run, validated as if on GPUs."""
    defaults = []
    if not any(o.startswith("trainer=") for o in overrides):
        defaults.append("trainer=gpu")
    if not any(o.startswith("strategy=") for o in overrides):
        defaults.append("strategy=auto")
    raw = compose("train", defaults + list(overrides))
    try:
        typed: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))  # type: ignore[assignment]
    except Exception as err:  # noqa: BLE001 - the same message load_config gives
        raise ConfigError(f"config: {err}") from None
    validate(typed, cuda_available=True)
    return typed


def main(overrides: list[str]) -> int:
    """`vseg plan [model=...] [trainer.devices=N] [gpu_memory=24GB] [cpu_memory=...] [train overrides]`."""
    rest, own = _split_args(overrides)
    cfg = load_for_planning(rest)
    gpu_memory = own.get("gpu_memory") or cfg.plan.gpu_memory
    cpu_memory = own.get("cpu_memory") or cfg.plan.cpu_memory
    quiet = logging.getLogger("vseg")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        plan = plan_for(cfg, gpu_memory, cpu_memory)
    finally:
        quiet.setLevel(level)
    print(render(plan))
    from vseg.planner.disk import cache_size, training_images

    print(cache_size(cfg, training_images(cfg)).line(cfg.feature_cache.enabled))
    return 0 if plan.recommended is not None else 1


def with_setting(cfg: TrainConfig, strategy: str, micro: int, accumulate: int) -> TrainConfig:
    """A copy of `cfg` that runs `strategy` at `micro` x `accumulate`."""
    trainer = dict(cfg.trainer)
    trainer["accumulate_grad_batches"] = accumulate
    return replace(cfg, strategy=strategy_config(strategy), data=replace(cfg.data, batch_size=micro), trainer=trainer)


def describe(e: Estimate) -> str:
    c = e.split()
    return (
        f"est. {_gb(e.total)} GB/GPU (frozen {c['frozen']:.1f}, trainable {c['trainable']:.1f}, grads "
        f"{c['grads']:.1f}, optimizer {c['optimizer']:.1f}, activations {c['activations']:.1f}, buffers "
        f"{c['buffers']:.1f})" + (f" + {_gb(e.host)} GB host RAM" if e.host >= 0.05 * GB else "")
    )
