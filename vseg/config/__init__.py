"""Typed configuration: the schema every composed Hydra config is checked against, and one `validate`.

Hydra composes YAML from `conf/`; `load_config` merges the result into these dataclasses (wrong types and
unknown keys fail there, naming the key), then `validate` collects every bad combination and raises once,
before anything is built or launched.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SEG_TOKEN = "[SEG]"
#: chat templates vseg knows (`vseg.model.tokenizer.TEMPLATES` defines them; a test keeps the two equal)
TEMPLATE_NAMES = ("qwen_chat", "phi3_chat", "internlm2_chat")

STRATEGIES = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")
MODEL_FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl")  # keys of vseg.model.families.FAMILIES


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


Spacing = tuple[float, float]  # (row, column) size of one pixel in millimetres


def parse_spacing(value: Any, where: str = "data.pixel_spacing") -> Spacing | None:
    """A pixel size in mm as (row, column): one number (square pixels), [row, col], or None (unknown).

    Raises:
        ConfigError: naming `where`, when the value is not one or two positive numbers.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        values = [value]
    elif isinstance(value, Sequence) and not isinstance(value, str):  # lists, tuples, OmegaConf's ListConfig
        values = list(value)
    else:
        values = []
    try:
        numbers = [float(v) for v in values if not isinstance(v, bool)]
    except (TypeError, ValueError):
        numbers = []
    numbers = numbers if len(numbers) == len(values) else []
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or not all(math.isfinite(v) and v > 0 for v in numbers):
        raise ConfigError(
            f"{where}={value!r}: expected the size of one pixel in millimetres, one positive number (square "
            "pixels) or [row, column], e.g. 0.3 or [0.3, 0.25]; null when unknown"
        )
    return numbers[0], numbers[1]


@dataclass
class ModelConfig:
    """Which Sa2VA network to build and how."""

    name: str = "tiny"  # label shown in logs and the run directory
    family: str = "internvl"  # MLLM family: internvl | qwen2_5_vl | qwen3_vl
    path: str | None = None  # local folder of a released Sa2VA checkpoint; None = random init
    tokenizer_path: str | None = None  # local tokenizer folder; None = `path`, or the tiny built-in one
    template: str = "qwen_chat"  # chat template of the base MLLM
    # train: Sa2VA's training prompt, image markers + "\n" + question (every family; what vseg trains on);
    # chat: its released predict_forward, image markers directly followed by the question (Qwen-VL: the folder's
    # own chat template when the tokenizer has one). See vseg.model.processor.
    prompt_style: str = "train"
    dtype: str = "float32"  # weight dtype of the frozen parts: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    vision: dict[str, Any] = field(default_factory=dict)  # InternVLVisionConfig fields
    text: dict[str, Any] = field(default_factory=dict)  # text model config fields (model_type; vocab_size fixes V)
    downsample_ratio: float = 0.5  # InternVL pixel-shuffle ratio
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = True  # tied input/output embeddings (Qwen2.5 small models)
    max_tiles: int = 1  # InternVL dynamic tiles per image (1..max_tiles, + thumbnail when > 1)
    image_factor: int = 28  # Qwen-VL: images first resized to a multiple of this (Sa2VA's qwen-vl-utils step)
    min_pixels: int = 401408  # Qwen-VL image processor: fewest pixels per image (Sa2VA: 512 * 28 * 28)
    max_pixels: int = 1605632  # Qwen-VL image processor: most pixels per image (Sa2VA: 2048 * 28 * 28)
    sam2: dict[str, Any] = field(default_factory=dict)  # Sam2Config fields (vision_config, ...)
    gradient_checkpointing: bool = False  # recompute LLM layers in backward to save activation memory
    init_device: str = "cpu"  # where a non-ZeRO-3 model is built: cpu | cuda (each rank's own GPU: fast start;
    # a random-init base then comes from the CUDA RNG, so predict/export, which rebuild on the CPU, differ)
    # Training: keep each image's frozen SAM-2 backbone features and reuse them on its later repeats and epochs:
    # none | gpu (where they were computed) | cpu (pinned host memory). Needs data.augment.enabled=false.
    sam_feature_cache: str = "none"


@dataclass
class LoraConfig:
    """What trains: LoRA on the LLM plus the Sa2VA heads."""

    enabled: bool = True  # LoRA adapters on the LLM's linear layers
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # LLM linear layers (leaf names) that get adapters
    train_projector: bool = True  # the vision->LLM projector (mlp1)
    train_mask_decoder: bool = True  # SAM-2 mask decoder
    train_text_hidden_fcs: bool = True  # the [SEG] -> SAM prompt projection
    train_new_token_rows: bool = True  # embedding / lm_head rows of [SEG] and the other added tokens


SOURCES = ("synthetic", "folders", "polygons", "coco")


@dataclass
class SplitConfig:
    """How records are divided into train and validation (always by image, never by repeat or object)."""

    mode: str = "random"  # random: val_fraction by seed | field: by a record's own split tag | files: id lists
    val_fraction: float = 0.125  # random: share of distinct images held out
    train_values: list[str] = field(default_factory=list)  # field: tags that go to train (e.g. DRIVE "training")
    val_values: list[str] = field(default_factory=list)  # field: tags that go to val (e.g. DRIVE "test")
    train_file: str | None = None  # files: text file, one record id per line
    val_file: str | None = None


@dataclass
class AugmentConfig:
    """Training-only augmentation; geometry is applied to image, masks and field of view alike."""

    enabled: bool = False
    hflip: float = 0.5  # probability of a horizontal flip
    vflip: float = 0.5
    rot90: float = 0.5  # probability of a random multiple of 90 degrees
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # zoom range; > 1 crops, < 1 pads
    brightness: float = 0.0  # max relative change, e.g. 0.2
    contrast: float = 0.0
    saturation: float = 0.0
    gamma: list[float] = field(default_factory=lambda: [1.0, 1.0])
    # 0: a fresh augmentation on every visit. N >= 1: each image has N fixed augmented variants (drawn from
    # data.seed and the image id) and every visit picks one (seeded by epoch and index), so the disk feature
    # cache (feature_cache.enabled) can hold exact features for each: N entries per image, less diversity.
    variants: int = 0


@dataclass
class DataConfig:
    """Where samples come from, how they are sized, checked, split, augmented and batched."""

    source: str = "synthetic"  # synthetic | folders | polygons | coco
    name: str = ""  # label used in reports (e.g. drive)
    # synthetic
    num_samples: int = 64  # distinct images generated
    style: str = "mixed"  # angiogram | fundus | mixed
    # folders: images + mask files matched by a regex with named groups, masks found by templates
    root: str | None = None
    image_pattern: str = r"(?P<id>[^/]+)\.(png|jpg|jpeg|tif|tiff|gif|bmp|ppm)"  # regex on the path under root
    mask_pattern: str = "masks/{id}.png"  # template filled with the image pattern's named groups
    fov_pattern: str | None = None  # optional field-of-view mask template (metrics count only inside it)
    # polygons / coco
    annotations: str | None = None  # JSON file
    image_root: str | None = None  # image paths in the JSON are relative to this (default: the JSON's folder)
    holes: str = "union"  # polygons of one object: union (COCO, Sa2VA) | even_odd (inner rings cut holes)
    categories: list[str] | None = None  # coco: category names to keep (None = all)
    objects: str = "merge"  # merge: one vessel mask per image | per_object: one prompt per object/category
    allow_empty: bool = False  # an image whose target mask is empty is a problem unless allowed
    skip_invalid: bool = False  # skip (and count) records with problems instead of refusing the dataset
    # size
    image_size: int | None = 128  # every image is resized to this square side; None keeps original sizes
    aspect: str = "stretch"  # stretch (Sa2VA: both branches resize without keeping aspect) | pad
    seed: int = 0  # generation, split, phrasing and augmentation seed
    split: SplitConfig = field(default_factory=SplitConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    repeats: int = 1  # each training image is seen `repeats` times per epoch
    batch_size: int = 2  # per-device micro-batch (with global_batch_size: the largest micro-batch allowed)
    global_batch_size: int | None = None  # samples per optimizer step over all devices; splits into
    # batch_size x trainer.accumulate_grad_batches per device for any device count (vseg/planner)
    val_batch_size: int = 4
    num_workers: int = 0  # DataLoader workers (decoding and resizing happen there)
    max_length: int = 512  # token budget per sample; longer samples are an error, not truncated
    prompts: list[str] = field(
        default_factory=lambda: [
            "Please segment the blood vessels in this image.",
            "Segment the vessels.",
            "Can you segment the vessel tree in this picture?",
            "Please output the segmentation mask of the vessels.",
        ]
    )  # question phrasings, drawn per sample
    object_prompts: list[str] = field(
        default_factory=lambda: [
            "Please segment the {phrase} in this image.",
            "Can you segment the {phrase}?",
            "What is the {phrase} in this image? Please respond with a segmentation mask.",
        ]
    )  # per_object phrasings; {phrase} is the object's text or category name
    answer: str = "It is [SEG]."  # supervised answer; must contain [SEG]
    # size of one pixel in mm at the images' own size: one number (square pixels) or [row, col]; null = unknown
    # (HD95 / ASSD then in pixels only). Validation rescales it to data.image_size.
    pixel_spacing: Any = None


@dataclass
class LossConfig:
    """Loss weights: loss = mask * BCE + dice * Dice + llm * CE."""

    mask_weight: float = 2.0
    dice_weight: float = 0.5
    llm_weight: float = 1.0
    mask_size: str = "low_res"  # low_res: targets resized to the logits (Sa2VA) | image: logits upsampled


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 4e-5
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.05  # share of optimizer steps spent warming up
    min_lr_ratio: float = 0.0  # cosine floor as a share of lr


@dataclass
class StrategyConfig:
    """How work is spread over devices (Hydra group `strategy`)."""

    name: str = "single"  # one of STRATEGIES
    gpu_only: bool = False  # refuses to start without CUDA
    stage: int = 0  # DeepSpeed ZeRO stage (0 = not DeepSpeed)
    offload_optimizer: bool = False  # DeepSpeed: optimizer states on CPU (DeepSpeedCPUAdam)
    offload_parameters: bool = False  # DeepSpeed ZeRO-3: parameters on CPU
    pin_memory: bool = True  # DeepSpeed offload: pinned host buffers
    find_unused_parameters: bool = False  # DDP
    timeout_minutes: int = 30  # collective timeout
    bucket_size: float = 5e7  # DeepSpeed reduce/allgather/prefetch bucket (elements); overlap_comm keeps ~4.5x in bf16


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_n_steps: int = 500
    keep: int = 3  # newest step checkpoints kept, plus last.ckpt
    save_last: bool = True


@dataclass
class FaultsConfig:
    """How a run reacts to signals, bad numbers and failed ranks (see FAULTS.md)."""

    handle_signals: bool = True  # SIGINT / SIGTERM / SIGUSR1: save a resumable checkpoint, then exit
    max_bad_steps: int = 5  # non-finite loss/gradient steps in a row before the run stops (0 = never)
    check_grads: bool = True  # also check gradients (not only the loss) before every optimizer step
    watchdog: bool = True  # multi-process: a failed or vanished rank stops every rank promptly
    heartbeat_timeout_s: float = 120.0  # a rank silent this long counts as dead


@dataclass
class SpeedConfig:
    """Per-step host work of training (vseg.training.speed); each switch is measured on its own in BENCHMARKS.md."""

    # Trainable weights held in bf16 in the model, fp32 master copies in the optimizer: no autocast copies of
    # fp32 LoRA weights on every use. Applies under precision=bf16-mixed without DeepSpeed (DeepSpeed's bf16
    # mode keeps fp32 masters itself); otherwise ignored.
    bf16_weights: bool = False
    # Liger Triton kernels (RMSNorm, SwiGLU, RoPE) in the LLM: needs CUDA and the `liger` extra
    # (pip install vseg[liger]); without them a warning and the transformers path.
    liger: bool = False
    # [SEG] and answer positions found on the host before the batch moves to the GPU, so the step's gathers
    # do not wait for the GPU (host syncs).
    host_positions: bool = True


@dataclass
class PlanConfig:
    """Memory planning (vseg/planner): what `strategy=auto`, the start-up report and OOM advice assume."""

    gpu_memory: str | None = None  # per-GPU memory to plan for, e.g. 24GB; None = the GPUs' free memory
    cpu_memory: str | None = None  # host RAM for offloading, e.g. 256GB; None = not checked


@dataclass
class FeatureCacheConfig:
    """The frozen encoders' outputs on local disk (vseg.training.feature_cache), shared by every rank of a node."""

    enabled: bool = False  # training reads each image's frozen features from disk, encoding it only once
    dir: str | None = None  # node-local directory; None = <run_dir>/feature_cache (one run); shareable between runs
    # which frozen outputs: sam (SAM-2 Hiera trunk + FPN neck) and vision (InternVL vision tower + pixel shuffle,
    # before the trained projector; the Qwen-VL families keep their vision tower in the step)
    parts: list[str] = field(default_factory=lambda: ["sam", "vision"])
    verify: str = "first"  # checksum an entry on its first read in a process (first) or on every read (always)


@dataclass
class TrainConfig:
    """Everything `train.py` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    feature_cache: FeatureCacheConfig = field(default_factory=FeatureCacheConfig)
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments
    logger: dict[str, Any] = field(default_factory=dict)  # TensorBoard logger options
    callbacks: dict[str, Any] = field(default_factory=dict)  # progress bar, overlays
    seed: int = 42
    run_dir: str | None = None  # None = runs/<timestamp>; shared by every rank
    runs_root: str = "runs"
    ckpt_path: str | None = None  # resume from this Lightning checkpoint
    resume: str | None = None  # null: continue a given run_dir's newest checkpoint | auto: also find the run


#: ModelConfig fields that change how the same weights run, not which weights exist: a trained model takes
#: another value of these (predict.py model.attn_implementation=eager); any other difference is another model.
MODEL_RUNTIME_FIELDS = (
    "dtype",
    "attn_implementation",
    "gradient_checkpointing",
    "init_device",
    "sam_feature_cache",
    "prompt_style",
    "max_tiles",
    "image_factor",
    "min_pixels",
    "max_pixels",
)
#: LoraConfig fields that decide which weights train and their shapes (alpha and dropout do not)
LORA_SHAPE_FIELDS = (
    "enabled",
    "r",
    "target_modules",
    "train_projector",
    "train_mask_decoder",
    "train_text_hidden_fcs",
    "train_new_token_rows",
)


def differences(old: Any, new: Any, key: str, only_new_keys: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs; `only_new_keys`: keys absent from `new`
    are not compared (a partial override)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) if only_new_keys else sorted(set(old) | set(new), key=str)
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{key}.{k}", only_new_keys)]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [(key, old, new)]


def model_differences(
    own: ModelConfig, given: dict[str, Any], only_given: bool = True
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(contradictions, runtime changes) between a trained model's config and model options `given`.

    `name` is a label and never compared; an unset `path` / `tokenizer_path` (a preset's null) says nothing.
    """
    mine = dataclasses.asdict(own)
    contradictions, runtime = [], []
    for field_name in given if only_given else mine:
        if field_name == "name" or field_name not in mine:
            continue
        if field_name in ("path", "tokenizer_path") and given.get(field_name) is None:
            continue
        found = differences(mine[field_name], given.get(field_name), f"model.{field_name}", only_given)
        (runtime if field_name in MODEL_RUNTIME_FIELDS else contradictions).extend(found)
    return contradictions, runtime


def describe_differences(found: list[tuple[str, Any, Any]], old: str, new: str, limit: int = 6) -> str:
    """`model.family: 'qwen3_vl' (run) vs 'internvl' (this command), ...`"""
    text = ", ".join(f"{k}: {a!r} ({old}) vs {b!r} ({new})" for k, a, b in found[:limit])
    return text + (f" and {len(found) - limit} more" if len(found) > limit else "")


def one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages on one line (an option list after "...:" joined by commas;
    doc links, the config search path and OmegaConf's key/type trailer dropped)."""
    text = str(getattr(err, "msg", None) or err).split("Config search path:")[0]
    skip = ("See https://", "full_key:", "object_type=", "reference_type=")
    lines = [line.strip() for line in text.splitlines()]
    parts: list[str] = []
    listing = False
    for line in (line for line in lines if line and not line.startswith(skip)):
        if listing and " " not in line:
            parts[-1] += ("" if parts[-1].endswith(":") else ",") + " " + line
            continue
        listing = line.endswith(":")
        parts.append(line)
    out = ""
    for part in parts:
        out = part if not out else f"{out}{' ' if out.endswith('.') else '; '}{part}"
    return out or type(err).__name__


def load_config(cfg: DictConfig | dict) -> TrainConfig:
    """Merges a composed config into the typed schema and validates it.

    Raises:
        ConfigError: naming the key for type errors and unknown keys, or listing every invalid combination.
    """
    schema = OmegaConf.structured(TrainConfig)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(f"config key `{key}`: {one_line(err)}") from None
    typed: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(typed)
    return typed


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


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Composes `conf/<config_name>.yaml` with command-line overrides; a bad override is a ConfigError."""
    # Hydra is imported by the commands that compose (not by every reader of these schemas).
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} not found; install vseg from its repository (pip install -e .)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{config_name} config with overrides {list(overrides)}: {one_line(err)}") from None


# predict.py's schema lives in its own module; imported last, it reads this module's names.
from vseg.config.predict import PredictConfig as PredictConfig  # noqa: E402
from vseg.config.predict import load_predict_config as load_predict_config  # noqa: E402
from vseg.config.serve import ServeConfig as ServeConfig  # noqa: E402
from vseg.config.serve import load_serve_config as load_serve_config  # noqa: E402
from vseg.config.serve import validate_serve as validate_serve  # noqa: E402
from vseg.config.trainer import validate_trainer  # noqa: E402
