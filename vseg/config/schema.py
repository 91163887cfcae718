"""The typed schema of `train.py`'s config: one dataclass per group, each field with a one-line comment.

A composed Hydra config is merged into `TrainConfig` (`vseg.config.loading.load_config`): wrong types and
unknown keys fail there, naming the key; `vseg.config.checks.validate` then checks the combinations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vseg.config.errors import ConfigError

SEG_TOKEN = "[SEG]"
#: chat templates vseg knows (`vseg.model.tokenizer.TEMPLATES` defines them; a test keeps the two equal)
TEMPLATE_NAMES = ("qwen_chat", "phi3_chat", "internlm2_chat")

STRATEGIES = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")
MODEL_FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl")  # keys of vseg.model.families.FAMILIES

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
    # torch.compile of every repeated block (LLM layers, vision tower, SAM-2 blocks; vseg.model.compile): fused
    # kernels, fewer launches per step. The first steps compile (about a minute on a GPU). Not with ZeRO-3.
    compile: bool = False
    # Nothing on the host waits for a step to end: the bad-step guard decides on the GPU (fused AdamW skips a
    # bad step itself; the warning comes one step later) and the next batch is copied to the GPU on a side
    # stream while the current backward runs.
    overlap_steps: bool = True
    # The LLM's compiled layers replay CUDA graphs (inductor's reduce-overhead mode, shapes fixed): one launch per
    # layer call instead of ~50-110, which is what bounds micro-batches 1-2. Needs speed.compile; text is padded
    # to a multiple of pad_tokens so that a few shapes are recorded. Single GPU and DDP; ignored under DeepSpeed
    # and on the CPU (a warning says so).
    cuda_graphs: bool = False
    # with cuda_graphs: text padded on the right to a multiple of this many tokens (64: one shape for one image
    # tile and a short prompt; smaller wastes less compute at large micro-batches but records more shapes)
    pad_tokens: int = 64


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
