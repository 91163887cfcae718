"""The facts the memory estimate stands on, read off a meta-device build of the model and its real processor.

The model is built on the meta device (shapes only, seconds even at 26B), so the parameter counts are exact:
frozen and trainable, per dtype, the largest layer, the decoder width and depth, every LoRA adapter
(`model_facts`). One dummy sample goes through the real processor, so the sequence length (image tokens per
tile x tiles + text) is the one training will see (`sequence_facts`). `vseg.planner.memory` does the
arithmetic on top.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from peft.tuners.lora import LoraLayer
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
from torch import nn

from vseg.config import TrainConfig
from vseg.model.processor import Sa2VAProcessor
from vseg.model.sizes import build_on_meta

ZERO3_PERSISTENCE_DEFAULT = 1e5  # DeepSpeed default: smaller tensors stay whole on every GPU


@dataclass
class LoraSite:
    """One adapted linear layer of a decoder block."""

    leaf: str  # q_proj, o_proj, down_proj, ...
    in_features: int
    r: int
    dropout: bool


@dataclass
class ModelFacts:
    """What the estimate needs to know about one model + training setup, read off a meta build."""

    name: str
    frozen_params: int
    frozen_bytes: int  # as built (model.dtype)
    trainable_params: int
    trainable_bytes: int  # as built (float32)
    small_params: int  # parameters in tensors below the ZeRO-3 persistence threshold
    largest_layer: tuple[str, int]  # (module, parameters held directly) e.g. the embedding or lm_head
    largest_block: tuple[str, int]  # (module, parameters) the biggest repeated block, e.g. a decoder layer
    llm_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    heads: int
    lora_sites: list[LoraSite]  # adapters of one decoder layer
    grad_through_llm: bool  # something before or inside the LLM trains: backward runs through every layer
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    projector_in: int  # width of the projector input (InternVL: 4 x vision hidden after pixel shuffle)
    sam_image: int
    sam_dim0: int  # Hiera stage-0 width
    sam_fpn: int  # FPN / mask decoder width
    weight_bytes: int  # bytes per frozen parameter as built
    attn_implementation: str = "sdpa"
    token_matrix: int = 0  # elements of the largest weight under a PEFT trainable-token layer (0: none)


@dataclass
class SequenceFacts:
    """Tokens of one training sample as the processor builds it."""

    image_tokens: int  # LLM placeholder tokens for the image (tokens per tile x tiles)
    tiles: int  # InternVL tiles (thumbnail included); Qwen-VL: 1
    text_tokens: int  # everything else: template, question, answer
    vision_tokens: int  # tokens through the vision tower (patches (+ class token) of every tile)
    image_side: int | None  # the square image side it was measured at (None: the worst case of max_tiles)

    @property
    def length(self) -> int:
        return self.image_tokens + self.text_tokens


def _sub(config: Any, *names: str, default: int = 0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value[0] if isinstance(value, list | tuple) else value)
    return default


def model_facts(cfg: TrainConfig) -> tuple[ModelFacts, Any, Any]:
    """Builds `cfg.model` with `cfg.lora` on the meta device and reads its facts; also returns model, tokenizer."""
    model_cfg = cfg.model
    if model_cfg.path is not None:  # the architecture is the preset's (checked against the folder at load)
        model_cfg = replace(model_cfg, path=None, tokenizer_path=None)
    model, tokenizer = build_on_meta(model_cfg, cfg.lora)
    frozen = frozen_b = trainable = trainable_b = small = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n, nbytes = p.numel(), p.numel() * p.element_size()
        if p.requires_grad:
            trainable, trainable_b = trainable + n, trainable_b + nbytes
        else:
            frozen, frozen_b = frozen + n, frozen_b + nbytes
        if n < ZERO3_PERSISTENCE_DEFAULT:
            small += n
    largest_layer = ("", 0)
    largest_block = ("", 0)
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own > largest_layer[1]:
            largest_layer = (name, own)
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                n = sum(p.numel() for p in child.parameters())
                if n > largest_block[1]:
                    largest_block = (f"{name}.{i}", n)
    token_layers = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
    token_matrix = max((m.get_base_layer().weight.numel() for m in token_layers), default=0)
    mllm_config = model.base_mllm.config
    text = mllm_config.get_text_config()
    vision = mllm_config.vision_config
    heads = _sub(text, "num_attention_heads")
    hidden = _sub(text, "hidden_size")
    head_dim = _sub(text, "head_dim", default=hidden // max(heads, 1))
    language = model.family.language_prefix
    sites: list[LoraSite] = []
    first_layer = None
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and language in name and ".layers." in name:
            layer = name.split(".layers.")[1].split(".")[0]
            first_layer = first_layer or layer
            if layer != first_layer:
                continue
            r = int(next(iter(module.r.values()), 0)) if module.r else 0
            drop = next(iter(module.lora_dropout.values()), None) if len(module.lora_dropout) else None
            sites.append(LoraSite(name.rsplit(".", 1)[-1], int(module.in_features), r, isinstance(drop, nn.Dropout)))
    base = model.base_mllm
    before_llm = any(
        p.requires_grad for n, p in base.named_parameters() if not n.startswith(language) and "lm_head" not in n
    )
    in_llm = any(p.requires_grad for n, p in base.named_parameters() if n.startswith(language))
    sam_cfg = model.grounding.sam.config
    backbone = sam_cfg.vision_config.backbone_config
    vision_hidden = _sub(vision, "hidden_size", "embed_dim")
    facts = ModelFacts(
        name=cfg.model.name,
        frozen_params=frozen,
        frozen_bytes=frozen_b,
        trainable_params=trainable,
        trainable_bytes=trainable_b,
        small_params=small,
        largest_layer=largest_layer,
        largest_block=largest_block,
        llm_layers=_sub(text, "num_hidden_layers"),
        hidden=hidden,
        intermediate=_sub(text, "intermediate_size"),
        kv_dim=_sub(text, "num_key_value_heads", default=heads) * head_dim,
        heads=heads,
        lora_sites=sites,
        grad_through_llm=before_llm or in_llm,
        vision_layers=_sub(vision, "num_hidden_layers", "depth"),
        vision_hidden=vision_hidden,
        vision_intermediate=_sub(vision, "intermediate_size", default=4 * vision_hidden),
        projector_in=vision_hidden * 4,
        sam_image=int(sam_cfg.prompt_encoder_config.image_size),
        sam_dim0=_sub(backbone, "embed_dim_per_stage", "hidden_size"),
        sam_fpn=int(sam_cfg.vision_config.fpn_hidden_size),
        weight_bytes=frozen_b // max(frozen, 1),
        attn_implementation=cfg.model.attn_implementation,
        token_matrix=token_matrix,
    )
    return facts, model, tokenizer


def sequence_facts(cfg: TrainConfig, model: Any, tokenizer: Any) -> SequenceFacts:
    """Token counts of one training sample, from the real processor on a blank square image.

    The image side is `data.image_size`; when images keep their own sizes (`data.image_size=null`) the
    worst case is planned: a grid of `model.max_tiles` tiles (+ thumbnail), or Qwen-VL's `max_pixels`.
    """
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, max_length=10**9)
    mllm_config = model.base_mllm.config
    side = cfg.data.image_size
    if side is None:
        side = model.family.largest_image_side(mllm_config, cfg.model)
    image = np.zeros((side, side, 3), dtype=np.uint8)
    question = max(cfg.data.prompts + [p.format(phrase="vessel") for p in cfg.data.object_prompts], key=len)
    features = processor.encode(image, question, cfg.data.answer)
    inputs = features["mllm_inputs"]
    image_token = model.base_mllm.config.image_token_id
    ids = features["input_ids"]
    image_tokens = int((ids == image_token).sum())
    if "image_grid_thw" in inputs:
        tiles, vision_tokens = 1, int(inputs["image_grid_thw"].prod())
    else:
        tiles = int(inputs["pixel_values"].shape[0])
        vision_config = mllm_config.vision_config
        per_tile = (_sub(vision_config, "image_size") // _sub(vision_config, "patch_size")) ** 2 + 1
        vision_tokens = tiles * per_tile
    return SequenceFacts(image_tokens, tiles, int(ids.numel()) - image_tokens, vision_tokens, cfg.data.image_size)
