"""Parameter counts per part of a Sa2VA build, without allocating: the model is built on the meta device.

`vseg info model=sa2va_8b [lora=...]` prints vision tower, projector, LLM, SAM-2 and `text_hidden_fcs`
counts (SAM-2 with its video memory: memory attention / encoder, object pointers, which Sa2VA ships and
runs on videos), the total and what trains under the chosen `lora` (adapters included). A SAM-2 too
narrow to track builds no memory; the parameters a release still holds for it are listed apart. A meta
build allocates nothing and takes seconds even at 26B.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import Sam2Model, Sam2VideoConfig, Sam2VideoModel

from vseg.config import LoraConfig, ModelConfig, TrainConfig, compose, load_config
from vseg.model.build import finish_build, new_sa2va, sam2_config

PARTS = ("vision", "projector", "llm", "sam2", "text_hidden_fcs")
ADAPTER_MARKERS = ("lora_", "trainable_tokens_")  # parameters PEFT adds next to the base weights


@dataclass
class PartCount:
    """Base parameters of one part and how many of them (plus adapters on it) train."""

    params: int = 0
    trainable: int = 0


@dataclass
class SizeReport:
    """Per-part parameter counts of one configuration."""

    name: str
    parts: dict[str, PartCount]
    adapters: int  # LoRA matrices and trainable token rows PEFT adds (not part of `total`)
    sam2_memory: int  # SAM-2 video-memory parameters of the release that this build lacks (too narrow to track)

    @property
    def total(self) -> int:
        """Base parameters as built (released weights that vseg loads), adapters excluded."""
        return sum(p.params for p in self.parts.values())

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.parts.values())

    @property
    def release_total(self) -> int:
        """Parameters of the released checkpoint: what is built plus the unused SAM-2 memory parts."""
        return self.total + self.sam2_memory

    def table(self) -> str:
        """A fixed-width table: one row per part, then total, release total and trainable."""
        rows = [(part, c.params, c.trainable) for part, c in self.parts.items()]
        rows.append(("total (built)", self.total, self.trainable))
        lines = [f"model {self.name}", f"{'part':<22}{'params':>16}{'trainable':>16}"]
        lines += [f"{name:<22}{n:>16,}{t:>16,}" for name, n, t in rows]
        if self.sam2_memory:
            lines.append(f"{'  + sam2 video memory':<22}{self.sam2_memory:>16,}{'(not built)':>16}")
        lines.append(f"{'release total':<22}{self.release_total:>16,}")
        share = 100.0 * self.trainable / max(self.total, 1)
        lines.append(f"trainable {self.trainable:,} ({share:.2f}% of built; {self.adapters:,} of it in adapters)")
        return "\n".join(lines)


def build_on_meta(model_cfg: ModelConfig, lora: LoraConfig | None):
    """The Sa2VA network with every tensor on the meta device (shapes only), and its tokenizer."""
    if model_cfg.path is not None:
        raise ValueError("sizes are computed from the architecture: leave model.path unset (model.path=null)")
    quiet = logging.getLogger("vseg.model.build")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with torch.device("meta"):
            model, tokenizer = new_sa2va(model_cfg)
            finish_build(model, tokenizer, model_cfg, lora)
            return model, tokenizer
    finally:
        quiet.setLevel(level)


def sam2_memory_parameters(sam2: dict) -> int:
    """Parameters of SAM-2's video-memory modules for these SAM-2 settings.

    Counted as the difference between transformers' video and image SAM-2 at the same sizes, minus the two
    SAM 2.1 additions (occlusion embedding, object-pointer temporal projection) that the SAM 2.0 checkpoint
    inside Sa2VA does not have.
    """
    image_cfg = sam2_config(sam2)
    video_cfg = Sam2VideoConfig(
        vision_config=image_cfg.vision_config.to_dict(),
        prompt_encoder_config=image_cfg.prompt_encoder_config.to_dict(),
        mask_decoder_config=image_cfg.mask_decoder_config.to_dict(),
        enable_occlusion_spatial_embedding=False,
        enable_temporal_pos_encoding_for_object_pointers=False,
    )
    with torch.device("meta"):
        image = Sam2Model(image_cfg)
        video = Sam2VideoModel(video_cfg)
    return sum(p.numel() for p in video.parameters()) - sum(p.numel() for p in image.parameters())


def part_of(name: str, family) -> str:
    """Which part a parameter of `Sa2VA.named_parameters()` belongs to."""
    if name.startswith("grounding."):
        return "sam2"
    if name.startswith("text_hidden_fcs."):
        return "text_hidden_fcs"
    if not name.startswith("mllm."):
        raise ValueError(f"parameter {name} is outside every known part")
    inner = name.removeprefix("mllm.").removeprefix("base_model.model.")
    if inner.startswith(family.projector_prefix):
        return "projector"
    if inner.startswith(family.vision_prefix):
        return "vision"
    return "llm"  # decoder layers, embeddings, final norm and (untied) lm_head


def size_report(model_cfg: ModelConfig, lora: LoraConfig | None) -> SizeReport:
    """Builds `model_cfg` on meta with the training setup `lora` and counts each part."""
    model, _ = build_on_meta(model_cfg, lora)
    parts = {p: PartCount() for p in PARTS}
    adapters = 0
    for name, param in model.named_parameters():  # shared (tied) tensors are yielded once
        count = parts[part_of(name, model.family)]
        if any(marker in name for marker in ADAPTER_MARKERS):
            adapters += param.numel()
        else:
            count.params += param.numel()
        if param.requires_grad:
            count.trainable += param.numel()
    # The video memory is built (and counted in `sam2`) whenever SAM-2 is wide enough to track; otherwise the
    # release still holds it and it is counted apart.
    unbuilt = 0 if getattr(model.grounding, "memory", None) is not None else sam2_memory_parameters(model_cfg.sam2)
    return SizeReport(model_cfg.name, parts, adapters, unbuilt)


def report_for(cfg: TrainConfig) -> SizeReport:
    """The size report of a composed training config (its model and its lora)."""
    return size_report(cfg.model, cfg.lora)


def main(overrides: list[str]) -> int:
    """`vseg info [model=...] [lora=...]`: prints the parameter table of the composed train config."""
    cfg = load_config(compose("train", overrides))
    print(report_for(cfg).table())
    return 0
