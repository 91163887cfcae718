"""`validate`: every impossible combination of a `TrainConfig`, collected and raised as one ConfigError."""

from __future__ import annotations

import re
from pathlib import Path

from vseg.config.errors import ConfigError
from vseg.config.schema import (
    MODEL_FAMILIES,
    SEG_TOKEN,
    SOURCES,
    STRATEGIES,
    TEMPLATE_NAMES,
    DataConfig,
    TrainConfig,
    parse_spacing,
)
from vseg.config.trainer import validate_trainer


def validate_data(d: DataConfig, need) -> None:
    """Source-specific required fields and paths; file-level problems are `vseg check`'s job."""
    need(d.source in SOURCES, f"data.source={d.source!r}: expected one of {SOURCES}")
    if d.source == "synthetic":
        need(d.style in ("angiogram", "fundus", "mixed"), f"data.style={d.style!r}: angiogram|fundus|mixed")
        need(d.num_samples >= 2, f"data.num_samples={d.num_samples}: need at least 2 (one train, one val)")
        need(d.image_size is not None, "data.image_size: synthetic images need a size")
    if d.source == "folders":
        if not d.root:
            need(False, "data.root is not set: data=folders needs data.root=DIR (images + masks)")
        else:
            need(Path(d.root).is_dir(), f"data.root={d.root}: no such directory")
        try:
            groups = set(re.compile(d.image_pattern).groupindex)
        except re.error as err:
            groups = set()
            need(False, f"data.image_pattern={d.image_pattern!r}: not a valid regular expression ({err})")
        need("id" in groups, f"data.image_pattern={d.image_pattern!r}: needs a named group (?P<id>...)")
        for key in ("mask_pattern", "fov_pattern"):
            template = getattr(d, key)
            if template is None:
                continue
            fields = set(re.findall(r"{(\w+)}", template))
            need(
                fields <= groups, f"data.{key}={template!r}: uses {sorted(fields - groups)} not named in image_pattern"
            )
    if d.source in ("polygons", "coco"):
        if not d.annotations:
            need(False, f"data.annotations is not set: data={d.source} needs data.annotations=FILE.json")
        else:
            need(Path(d.annotations).is_file(), f"data.annotations={d.annotations}: no such file")
        if d.image_root:
            need(Path(d.image_root).is_dir(), f"data.image_root={d.image_root}: no such directory")
    need(d.holes in ("union", "even_odd"), f"data.holes={d.holes!r}: union|even_odd")
    try:
        parse_spacing(d.pixel_spacing)
    except ConfigError as err:
        need(False, str(err))
    need(d.objects in ("merge", "per_object"), f"data.objects={d.objects!r}: merge|per_object")
    need(d.aspect in ("stretch", "pad"), f"data.aspect={d.aspect!r}: stretch|pad")
    need(d.image_size is None or d.image_size >= 32, f"data.image_size={d.image_size}: must be >= 32 (or null)")
    s = d.split
    need(s.mode in ("random", "field", "files"), f"data.split.mode={s.mode!r}: random|field|files")
    if s.mode == "random":
        need(0.0 < s.val_fraction < 1.0, f"data.split.val_fraction={s.val_fraction}: must be in (0, 1)")
    if s.mode == "field":
        need(bool(s.train_values) and bool(s.val_values), "data.split.mode=field needs train_values and val_values")
    if s.mode == "files":
        for key in ("train_file", "val_file"):
            value = getattr(s, key)
            need(bool(value) and Path(value).is_file(), f"data.split.{key}={value}: no such file (split.mode=files)")
    a = d.augment
    need(all(0.0 <= p <= 1.0 for p in (a.hflip, a.vflip, a.rot90)), "data.augment: flip/rot90 probabilities in [0, 1]")
    for key in ("scale", "gamma"):
        lo_hi = getattr(a, key)
        need(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1],
            f"data.augment.{key}={lo_hi}: need [low, high], 0 < low <= high",
        )
    need(min(a.brightness, a.contrast, a.saturation) >= 0, "data.augment: brightness/contrast/saturation >= 0")
    need(d.repeats >= 1, f"data.repeats={d.repeats}: must be >= 1")
    need(d.batch_size >= 1 and d.val_batch_size >= 1, "data.batch_size and data.val_batch_size must be >= 1")
    need(d.num_workers >= 0, f"data.num_workers={d.num_workers}: must be >= 0")
    need(bool(d.prompts), "data.prompts is empty")
    need(
        d.objects != "per_object" or all("{phrase}" in p for p in d.object_prompts) and bool(d.object_prompts),
        "data.object_prompts: each phrasing needs {phrase} (data.objects=per_object)",
    )


def validate_feature_cache(cfg: TrainConfig, need) -> None:
    """`feature_cache.*` and `data.augment.variants`."""
    fc = cfg.feature_cache
    variants = cfg.data.augment.variants
    need(variants >= 0, f"data.augment.variants={variants}: 0 (fresh augmentation every visit) or a count >= 1")
    need(
        set(fc.parts) <= {"sam", "vision"} and bool(fc.parts),
        f"feature_cache.parts={list(fc.parts)}: a non-empty list of sam, vision",
    )
    need(fc.verify in ("first", "always"), f"feature_cache.verify={fc.verify!r}: first|always")
    if not fc.enabled:
        return
    need(
        not cfg.data.augment.enabled or variants >= 1,
        "feature_cache.enabled=true with data.augment.enabled=true needs data.augment.variants=N (N fixed augmented "
        "variants per image, each encoded once): features are exact only for pixels that were encoded",
    )
    need(
        cfg.model.sam_feature_cache == "none",
        f"feature_cache.enabled=true and model.sam_feature_cache={cfg.model.sam_feature_cache}: pick one "
        "(the disk cache also holds the SAM-2 features)",
    )


def validate(cfg: TrainConfig, cuda_available: bool | None = None) -> None:
    """Collects every impossible setting and raises one ConfigError listing them all."""
    import torch  # here only: importing vseg.config (every command line, first) stays free of torch

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    errors: list[str] = []
    t = cfg.trainer

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    validate_trainer(t, need)
    need(
        cfg.strategy.name in (*STRATEGIES, "auto"),
        f"strategy.name={cfg.strategy.name!r}: expected one of {STRATEGIES} or auto",
    )
    gbs = cfg.data.global_batch_size
    need(gbs is None or gbs >= 1, f"data.global_batch_size={gbs}: must be >= 1 (or null)")
    need(cfg.model.family in MODEL_FAMILIES, f"model.family={cfg.model.family!r}: expected one of {MODEL_FAMILIES}")
    need(
        0 < cfg.model.min_pixels <= cfg.model.max_pixels and cfg.model.image_factor > 0,
        f"model.min_pixels={cfg.model.min_pixels}, max_pixels={cfg.model.max_pixels}, "
        f"image_factor={cfg.model.image_factor}: need 0 < min_pixels <= max_pixels and image_factor > 0",
    )
    need(
        cfg.model.template in TEMPLATE_NAMES,
        f"model.template={cfg.model.template!r}: expected one of {sorted(TEMPLATE_NAMES)}",
    )
    need(cfg.model.prompt_style in ("train", "chat"), f"model.prompt_style={cfg.model.prompt_style!r}: train|chat")
    need(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype!r}: float32|bfloat16|float16",
    )
    need(cfg.model.init_device in ("cpu", "cuda"), f"model.init_device={cfg.model.init_device!r}: cpu|cuda")
    need(cfg.model.max_tiles >= 1, f"model.max_tiles={cfg.model.max_tiles}: must be >= 1")
    cache = cfg.model.sam_feature_cache
    need(cache in ("none", "gpu", "cpu"), f"model.sam_feature_cache={cache!r}: none|gpu|cpu")
    if cache != "none":
        need(
            not cfg.data.augment.enabled,
            f"model.sam_feature_cache={cache} needs data.augment.enabled=false: an augmented image differs on every "
            "repeat, so its features cannot be reused",
        )
        need(
            cfg.strategy.stage != 3,
            f"model.sam_feature_cache={cache} is not supported with strategy={cfg.strategy.name}: skipping the "
            "frozen encoder changes the module order ZeRO-3 prefetches by (untested); use ddp, zero2 or zero2_offload",
        )
    validate_feature_cache(cfg, need)
    need(
        not (cfg.speed.compile and cfg.strategy.stage == 3),
        f"speed.compile=true is not supported with strategy={cfg.strategy.name}: ZeRO-3 gathers each block's "
        "weights in hooks around its forward, which compiled blocks bypass; set speed.compile=false, or pick "
        "ddp, zero2 or zero2_offload",
    )
    need(
        cfg.speed.compile or not cfg.speed.cuda_graphs,
        "speed.cuda_graphs=true replays the compiled LLM layers as CUDA graphs: it needs speed.compile=true",
    )
    need(cfg.speed.pad_tokens >= 1, f"speed.pad_tokens={cfg.speed.pad_tokens}: must be >= 1 (1: no padding)")
    need(cfg.lora.r > 0 and cfg.lora.alpha > 0, "lora.r and lora.alpha must be positive")
    need(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout={cfg.lora.dropout}: must be in [0, 1)")
    need(bool(cfg.lora.target_modules) or not cfg.lora.enabled, "lora.target_modules is empty while lora.enabled")
    d = cfg.data
    validate_data(d, need)
    need(d.answer.count(SEG_TOKEN) == 1, f"data.answer={d.answer!r}: must contain {SEG_TOKEN} exactly once")
    need(cfg.loss.mask_size in ("low_res", "image"), f"loss.mask_size={cfg.loss.mask_size!r}: low_res|image")
    need(min(cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.llm_weight) >= 0, "loss weights must be >= 0")
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0")
    need(0.0 <= cfg.optim.warmup_ratio < 1.0, f"optim.warmup_ratio={cfg.optim.warmup_ratio}: must be in [0, 1)")
    need(cfg.checkpoint.every_n_steps >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every_n_steps and keep >= 1")
    need(cfg.resume in (None, "auto", "never"), f"resume={cfg.resume!r}: null | auto | never")
    need(cfg.faults.max_bad_steps >= 0, f"faults.max_bad_steps={cfg.faults.max_bad_steps}: must be >= 0")
    need(cfg.faults.heartbeat_timeout_s > 0, "faults.heartbeat_timeout_s must be > 0")

    accelerator = str(t.get("accelerator", "auto"))
    devices = t.get("devices", "auto")
    num_nodes = t.get("num_nodes", 1)
    if any(e.startswith(("trainer.devices=", "trainer.num_nodes=")) for e in errors):
        devices, num_nodes = "auto", 1  # already reported; the strategy checks below would repeat it
    if not cuda:
        advice = "run on a machine with NVIDIA GPUs, or use strategy=single (or ddp with trainer.accelerator=cpu)"
        need(not cfg.strategy.gpu_only, f"strategy={cfg.strategy.name} needs CUDA GPUs and none is visible: {advice}")
        need(
            accelerator not in ("gpu", "cuda"),
            f"trainer.accelerator={accelerator} but no CUDA GPU is visible: {advice}",
        )
        if cfg.strategy.name == "single" and devices not in ("auto", 1, "1", -1):
            errors.append(f"trainer.devices={devices} with strategy=single: use strategy=ddp for several processes")
    if cfg.strategy.name == "single":
        need(
            devices in ("auto", 1, "1") and num_nodes == 1,
            f"strategy=single runs one process; trainer.devices={devices} num_nodes={num_nodes}: use strategy=ddp or zero*",
        )
    if cfg.strategy.offload_parameters and cfg.strategy.stage != 3:
        errors.append("strategy.offload_parameters needs ZeRO stage 3 (strategy=zero3_offload)")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
