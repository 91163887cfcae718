"""The Qwen-VL families (Qwen2.5-VL, Qwen3-VL): Sa2VA v2 3B/7B (Qwen2.5-VL) and 2B/4B (Qwen3-VL).

Everything that is Qwen-VL about a Sa2VA model lives here: transformers' native models and image processor,
the two-step resize and prompt placeholders; the released layout (keys and config.json, both ways) is in
`qwen_vl_release` next to it.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
import transformers
from PIL import Image
from torch import nn
from transformers import (
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from vseg.config import ModelConfig
from vseg.model.families.base import embedding_device, shared_image_embeds, to_device, vocab_size
from vseg.model.families.qwen_vl_release import (
    QWEN_ARCHITECTURE,
    QWEN_PROCESSOR_FILES,
    QwenVLLayout,
    qwen_architecture_from_config,
    qwen_config_from_mllm,
    qwen_family,
)
from vseg.model.preprocess import check_resize, pil_chw, resize_uint8
from vseg.model.tokenizer import (
    QWEN_IMAGE_PAD_TOKEN,
    QWEN_VIDEO_PAD_TOKEN,
    QWEN_VISION_END_TOKEN,
    QWEN_VISION_START_TOKEN,
    SA2VA_ADDED_TOKENS,
    token_id,
)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """A (height, width) near the input with both sides multiples of `factor` and an area within bounds.

    Sides are rounded to the nearest multiple first; an area above `max_pixels` (below `min_pixels`) is then
    shrunk (grown) by one common scale, rounding down (up) so the bound holds. Qwen-VL's resize rule.
    """
    if min(height, width) < 1:
        raise ValueError(f"image of size {width}x{height} is empty")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@lru_cache(maxsize=8)
def _qwen_image_processor(
    patch: int, merge: int, temporal: int, min_pixels: int, max_pixels: int, mean: tuple, std: tuple
) -> Any:
    """The transformers Qwen-VL image processor, built from numbers (no download); the PIL backend when present."""
    # the PIL-backed class exists in some transformers versions only
    cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return cls(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=temporal,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


class QwenVLFamily:
    """Shared part of Qwen2.5-VL and Qwen3-VL: transformers' native models, native image processor.

    The image goes through two resizes, as in Sa2VA's Qwen code: first to a multiple of `model.image_factor`
    (28, qwen-vl-utils' rule), then by the image processor to a multiple of patch x merge within
    [model.min_pixels, model.max_pixels]. The prompt holds `<|vision_start|>`, one `<|image_pad|>` per merged
    patch and `<|vision_end|>`.
    """

    name = "qwen_vl"
    vision_prefix = "model.visual."
    projector_prefix: str | tuple[str, ...] = "model.visual.merger."
    language_prefix = "model.language_model."
    # The image tokens are the Qwen tokenizer's own (<|vision_start|>, <|image_pad|>, ...): Sa2VA adds only its five.
    added_tokens = SA2VA_ADDED_TOKENS
    # The merger (the projector, trained) sits inside `visual` and Qwen3-VL's deepstack mergers read the
    # tower's middle layers: the frozen blocks are not cached apart (the disk cache keeps SAM-2 only).
    vision_cacheable = False
    release_architecture = QWEN_ARCHITECTURE
    processor_files = QWEN_PROCESSOR_FILES
    config_class: Any = None
    model_class: Any = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def make_config(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
        """The transformers config; vocabulary per `vocab_size`, vision token ids from the tokenizer."""
        text = copy.deepcopy(dict(cfg.text))  # transformers may write into what it is given (see build.sam2_config)
        text.pop("model_type", None)
        text["vocab_size"] = vocab_size(cfg, tokenizer)
        text["tie_word_embeddings"] = cfg.tie_word_embeddings
        vocab = tokenizer.get_vocab()
        video = vocab.get(QWEN_VIDEO_PAD_TOKEN, token_id(tokenizer, QWEN_IMAGE_PAD_TOKEN))
        config = self.config_class(
            text_config=text,
            vision_config=copy.deepcopy(dict(cfg.vision)),
            image_token_id=token_id(tokenizer, QWEN_IMAGE_PAD_TOKEN),
            video_token_id=int(video),
            vision_start_token_id=token_id(tokenizer, QWEN_VISION_START_TOKEN),
            vision_end_token_id=token_id(tokenizer, QWEN_VISION_END_TOKEN),
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        config._attn_implementation = cfg.attn_implementation
        return config

    def build(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
        return self.model_class(self.make_config(cfg, tokenizer))

    def text_hidden_size(self, mllm: nn.Module) -> int:
        return int(mllm.config.text_config.hidden_size)

    def image_processor(self, mllm_config: Any, cfg: ModelConfig) -> Any:
        vision = mllm_config.vision_config
        return _qwen_image_processor(
            int(vision.patch_size),
            int(vision.spatial_merge_size),
            int(vision.temporal_patch_size),
            int(cfg.min_pixels),
            int(cfg.max_pixels),
            tuple(self.image_mean),
            tuple(self.image_std),
        )

    def image_inputs(
        self, mllm_config: Any, cfg: ModelConfig, image: Image.Image, resize: str = "pil"
    ) -> tuple[dict[str, torch.Tensor], str]:
        """`resize` picks how vseg makes the first resize (pil | torch, `vseg.model.preprocess`); the second one,
        into the pixel bounds, is the transformers image processor's own and does not change with it."""
        factor = int(cfg.image_factor)
        # qwen-vl-utils' first resize: multiple of `factor`, area within [4, 16384] * factor^2.
        height, width = smart_resize(image.height, image.width, factor, 4 * factor * factor, 16384 * factor * factor)
        pixels: Image.Image | torch.Tensor = image
        if check_resize(resize) == "torch":
            # a (3, H, W) uint8 tensor: the image processor reads it as the same pixels a PIL image would give
            pixels = resize_uint8(pil_chw(image), height, width)
        elif (width, height) != image.size:
            pixels = image.resize((width, height), Image.Resampling.BICUBIC)
        out = self.image_processor(mllm_config, cfg)(images=[pixels], return_tensors="pt")
        grid = out["image_grid_thw"].long()
        merge = int(mllm_config.vision_config.spatial_merge_size)
        n_tokens = int(grid.prod()) // (merge * merge)
        text = f"{QWEN_VISION_START_TOKEN}{QWEN_IMAGE_PAD_TOKEN * n_tokens}{QWEN_VISION_END_TOKEN}"
        return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": grid}, text

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Patches of all images in one sequence; image_grid_thw says where each image's patches are.
        return {
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
            "image_grid_thw": torch.cat([item["image_grid_thw"] for item in items]),
        }

    @staticmethod
    def _accepts(module: nn.Module, argument: str) -> bool:
        return argument in inspect.signature(module.forward).parameters

    def decoder_states(
        self,
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = embedding_device(mllm)
        visual = mllm.model.visual
        vision_param = next(visual.parameters())
        input_ids = input_ids.to(device)
        if row_image is not None:
            return self._shared_image_states(mllm, input_ids, to_device(attention_mask, device), inputs, row_image)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": to_device(attention_mask, device),
            "pixel_values": inputs["pixel_values"].to(device=vision_param.device, dtype=vision_param.dtype),
            "image_grid_thw": inputs["image_grid_thw"].to(vision_param.device),
            "use_cache": False,
        }
        if self._accepts(mllm.model, "mm_token_type_ids"):
            # 1 marks image placeholders; the 3-D rope positions are computed from it.
            kwargs["mm_token_type_ids"] = (input_ids == mllm.config.image_token_id).int()
        return mllm.model(**kwargs).last_hidden_state

    def _shared_image_states(
        self,
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs: dict[str, Any],
        row_image: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder over rows that share images: the vision encoder (mergers included) once per image.

        The same steps as the Qwen-VL model's forward: token embeddings with the merged image embeddings
        scattered into the `<|image_pad|>` placeholders, 3-D rope positions from each row's image grid, and
        (Qwen3-VL) the deepstack features added to the first decoder layers at those placeholders; only the
        image embeddings are computed per image and gathered per row.
        """
        model = mllm.model
        visual = model.visual
        param = next(visual.parameters())
        grid = inputs["image_grid_thw"]
        pixels = inputs["pixel_values"].to(device=param.device, dtype=param.dtype)
        out = visual(pixels, grid_thw=grid.to(param.device), return_dict=True)
        embeddings = out.pooler_output  # merged tokens of all images, in image order
        inputs_embeds, placeholders, index = shared_image_embeds(
            model.get_input_embeddings(), input_ids, mllm.config.image_token_id, row_image, embeddings
        )
        rope: dict[str, Any] = {
            "image_grid_thw": grid.to(input_ids.device)[row_image.to(input_ids.device)],
            "attention_mask": attention_mask,
        }
        if "mm_token_type_ids" in inspect.signature(model.get_rope_index).parameters:
            rope["mm_token_type_ids"] = placeholders.int()
        position_ids, _ = model.get_rope_index(input_ids, **rope)
        extra: dict[str, Any] = {}
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack:
            extra["visual_pos_masks"] = placeholders
            extra["deepstack_visual_embeds"] = [d[index.to(d.device)] for d in deepstack]
        states = model.language_model(
            input_ids=None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return states.last_hidden_state

    def lm_head(self, mllm: nn.Module) -> nn.Module:
        return mllm.lm_head

    def input_embeddings(self, mllm: nn.Module) -> nn.Embedding:
        return mllm.get_input_embeddings()

    def generate_inputs(self, mllm: nn.Module, input_ids: torch.Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        vision = next(mllm.model.visual.parameters())
        kwargs: dict[str, Any] = {
            "pixel_values": inputs["pixel_values"].to(device=vision.device, dtype=vision.dtype),
            "image_grid_thw": inputs["image_grid_thw"].to(vision.device),
        }
        if self._accepts(mllm.model, "mm_token_type_ids"):
            kwargs["mm_token_type_ids"] = (input_ids == mllm.config.image_token_id).int()
        return kwargs

    def largest_image_side(self, mllm_config: Any, cfg: ModelConfig) -> int:
        return int(math.sqrt(cfg.max_pixels))

    # ---- released checkpoints ---------------------------------------------------------------------------------
    def reads_config(self, config: Mapping[str, Any]) -> bool:
        return qwen_family(config) == self.name

    def architecture_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return qwen_architecture_from_config(config)

    def layout(
        self, cfg: ModelConfig, *, with_grounding: bool = True, llm_architecture: str | None = None
    ) -> QwenVLLayout:
        return QwenVLLayout(with_grounding=with_grounding)  # one LLM layout: transformers' own names

    def official_config(self, mllm_config: Any, cfg: ModelConfig, *, vocab_size: int, dtype: str) -> dict[str, Any]:
        return qwen_config_from_mllm(mllm_config, template=cfg.template, dtype=dtype)

    def release_config(self, config: Mapping[str, Any], *, vocab_size: int, dtype: str) -> dict[str, Any]:
        out = json.loads(json.dumps(config))  # a deep copy of plain JSON values
        # nested text_config, or (saved by older transformers) top-level text fields
        text = out["text_config"] if isinstance(out.get("text_config"), dict) else out
        text["vocab_size"] = vocab_size
        text["torch_dtype"] = dtype
        out["torch_dtype"] = dtype
        return out


class Qwen25VLFamily(QwenVLFamily):
    """Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): window-attention ViT, 14-px patches, CLIP mean/std."""

    name = "qwen2_5_vl"
    config_class = Qwen2_5_VLConfig
    model_class = Qwen2_5_VLForConditionalGeneration
    image_mean = (0.48145466, 0.4578275, 0.40821073)
    image_std = (0.26862954, 0.26130258, 0.27577711)


class Qwen3VLFamily(QwenVLFamily):
    """Qwen3-VL (`Qwen3VLForConditionalGeneration`): 16-px patches, deepstack mergers feed early LLM layers."""

    name = "qwen3_vl"
    projector_prefix = ("model.visual.merger.", "model.visual.deepstack_merger_list.")
    config_class = Qwen3VLConfig
    model_class = Qwen3VLForConditionalGeneration
