"""Typed configuration: the schema every composed Hydra config is checked against, and one `validate`.

Hydra composes YAML from `conf/`; `load_config` merges the result into these dataclasses (wrong types and
unknown keys fail there, naming the key), then `validate` collects every bad combination and raises once,
before anything is built or launched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

STRATEGIES = ("single", "ddp", "zero2", "zero2_offload", "zero3", "zero3_offload")


class ConfigError(ValueError):
    """A configuration that cannot run; the message lists every problem found."""


@dataclass
class ModelConfig:
    """Which Sa2VA network to build and how."""

    name: str = "tiny"  # label shown in logs and the run directory
    family: str = "internvl"  # MLLM family: internvl (qwen2_5_vl / qwen3_vl plug in here)
    path: str | None = None  # local folder of a released Sa2VA checkpoint; None = random init
    tokenizer_path: str | None = None  # local tokenizer folder; None = `path`, or the tiny built-in one
    template: str = "qwen_chat"  # chat template of the base MLLM
    dtype: str = "float32"  # weight dtype of the frozen parts: float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # eager | sdpa | flash_attention_2
    vision: dict[str, Any] = field(default_factory=dict)  # InternVLVisionConfig fields
    text: dict[str, Any] = field(default_factory=dict)  # text model config fields, with model_type
    downsample_ratio: float = 0.5  # InternVL pixel-shuffle ratio
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = True  # tied input/output embeddings (Qwen2.5 small models)
    max_tiles: int = 1  # InternVL dynamic tiles per image (1..max_tiles, + thumbnail when > 1)
    sam2: dict[str, Any] = field(default_factory=dict)  # Sam2Config fields (vision_config, ...)
    gradient_checkpointing: bool = False  # recompute LLM layers in backward to save activation memory


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


@dataclass
class DataConfig:
    """Where samples come from and how they are batched."""

    source: str = "synthetic"  # synthetic (more sources: folders, polygons, coco)
    num_samples: int = 64  # synthetic: distinct images generated
    image_size: int = 128  # images are generated (or rescaled) to this square size
    style: str = "mixed"  # synthetic: angiogram | fundus | mixed
    seed: int = 0  # generation and split seed
    val_fraction: float = 0.125  # share of distinct images held out for validation
    repeats: int = 1  # each training image is seen `repeats` times per epoch
    batch_size: int = 2  # per-device micro-batch
    val_batch_size: int = 4
    num_workers: int = 0  # DataLoader workers
    max_length: int = 512  # token budget per sample; longer samples are an error, not truncated
    prompts: list[str] = field(
        default_factory=lambda: [
            "Please segment the blood vessels in this image.",
            "Segment the vessels.",
            "Can you segment the vessel tree in this picture?",
            "Please output the segmentation mask of the vessels.",
        ]
    )  # question phrasings, drawn per sample
    answer: str = "It is [SEG]."  # supervised answer; must contain [SEG]


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


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_n_steps: int = 500
    keep: int = 3  # newest step checkpoints kept, plus last.ckpt
    save_last: bool = True


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
    trainer: dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments
    logger: dict[str, Any] = field(default_factory=dict)  # TensorBoard logger options
    callbacks: dict[str, Any] = field(default_factory=dict)  # progress bar, overlays
    seed: int = 42
    run_dir: str | None = None  # None = runs/<timestamp>; shared by every rank
    runs_root: str = "runs"
    ckpt_path: str | None = None  # resume from this Lightning checkpoint


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
        raise ConfigError(f"config key `{key}`: {err.msg if hasattr(err, 'msg') else err}") from None
    typed: TrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(typed)
    return typed


def _trainer_arguments() -> set[str]:
    import lightning

    return set(inspect.signature(lightning.Trainer.__init__).parameters) - {"self"}


def validate(cfg: TrainConfig, cuda_available: bool | None = None) -> None:
    """Collects every impossible setting and raises one ConfigError listing them all."""
    import torch

    from vseg.model.tokenizer import SEG_TOKEN, TEMPLATES

    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    errors: list[str] = []
    t = cfg.trainer

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    unknown = set(t) - _trainer_arguments()
    need(not unknown, f"trainer: unknown lightning.Trainer arguments {sorted(unknown)}")
    need("strategy" not in t, "trainer.strategy: choose the strategy with `strategy=<name>`, not trainer.strategy")
    need(cfg.strategy.name in STRATEGIES, f"strategy.name={cfg.strategy.name!r}: expected one of {STRATEGIES}")
    need(cfg.model.family == "internvl", f"model.family={cfg.model.family!r}: only 'internvl' is built today")
    need(cfg.model.template in TEMPLATES, f"model.template={cfg.model.template!r}: expected one of {sorted(TEMPLATES)}")
    need(
        cfg.model.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={cfg.model.dtype!r}: float32|bfloat16|float16",
    )
    need(cfg.model.max_tiles >= 1, f"model.max_tiles={cfg.model.max_tiles}: must be >= 1")
    need(cfg.lora.r > 0 and cfg.lora.alpha > 0, "lora.r and lora.alpha must be positive")
    need(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout={cfg.lora.dropout}: must be in [0, 1)")
    need(bool(cfg.lora.target_modules) or not cfg.lora.enabled, "lora.target_modules is empty while lora.enabled")
    d = cfg.data
    need(d.source == "synthetic", f"data.source={d.source!r}: only 'synthetic' exists today")
    need(d.style in ("angiogram", "fundus", "mixed"), f"data.style={d.style!r}: angiogram|fundus|mixed")
    need(d.num_samples >= 2, f"data.num_samples={d.num_samples}: need at least 2 (one train, one val)")
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction}: must be in (0, 1)")
    need(d.repeats >= 1, f"data.repeats={d.repeats}: must be >= 1")
    need(d.batch_size >= 1 and d.val_batch_size >= 1, "data.batch_size and data.val_batch_size must be >= 1")
    need(d.image_size >= 32, f"data.image_size={d.image_size}: must be >= 32")
    need(bool(d.prompts), "data.prompts is empty")
    need(d.answer.count(SEG_TOKEN) == 1, f"data.answer={d.answer!r}: must contain {SEG_TOKEN} exactly once")
    need(cfg.loss.mask_size in ("low_res", "image"), f"loss.mask_size={cfg.loss.mask_size!r}: low_res|image")
    need(min(cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.llm_weight) >= 0, "loss weights must be >= 0")
    need(cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr}: must be > 0")
    need(0.0 <= cfg.optim.warmup_ratio < 1.0, f"optim.warmup_ratio={cfg.optim.warmup_ratio}: must be in [0, 1)")
    need(cfg.checkpoint.every_n_steps >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every_n_steps and keep >= 1")
    accum = t.get("accumulate_grad_batches", 1)
    need(isinstance(accum, int) and accum >= 1, f"trainer.accumulate_grad_batches={accum}: must be an int >= 1")

    accelerator = str(t.get("accelerator", "auto"))
    devices = t.get("devices", "auto")
    num_nodes = t.get("num_nodes", 1)
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
