"""MLLM families: everything that differs between InternVL and the Qwen-VL models, behind one interface.

A family builds its transformers model from `ModelConfig`, turns an image into that model's inputs (and
says how many placeholder tokens the prompt needs), batches those inputs, and runs the decoder to the
last hidden state. `Sa2VA`, the data pipeline and the trainer only talk to this interface, so a new family
(Qwen2.5-VL, Qwen3-VL) is one more class here plus its config files.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from transformers import (
    AutoConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    PreTrainedTokenizerBase,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from vseg.config import ModelConfig
from vseg.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, internvl_tiles, normalise
from vseg.model.tokenizer import (
    IMAGE_TOKENS,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    QWEN_IMAGE_PAD_TOKEN,
    QWEN_VIDEO_PAD_TOKEN,
    QWEN_VISION_END_TOKEN,
    QWEN_VISION_START_TOKEN,
    SA2VA_ADDED_TOKENS,
    token_id,
)


class MLLMFamily(Protocol):
    """The per-family operations Sa2VA needs."""

    name: str
    #: parameter-name prefixes (relative to the transformers model) of each part; the projector may sit
    #: inside the vision prefix (Qwen-VL mergers) and may have several prefixes (Qwen3-VL deepstack mergers)
    vision_prefix: str
    projector_prefix: str | tuple[str, ...]
    language_prefix: str
    #: tokens a Sa2VA checkpoint of this family adds to its base tokenizer (and a base MLLM gets at load time)
    added_tokens: tuple[str, ...]

    def build(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module: ...

    def text_hidden_size(self, mllm: nn.Module) -> int: ...

    def image_inputs(
        self, mllm_config: Any, cfg: ModelConfig, image: Image.Image
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Per-sample model inputs and the text that stands for the image in the prompt."""
        ...

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def decoder_states(
        self,
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, L, D).

        `inputs` holds one image per row; with `row_image` (B,) it holds the images that the rows share (several
        questions about one image): each image then goes through the vision encoder once, and its embeddings are
        scattered into the placeholders of every row that shows it (`row_token_index`).
        """
        ...

    def lm_head(self, mllm: nn.Module) -> nn.Module: ...

    def input_embeddings(self, mllm: nn.Module) -> nn.Embedding: ...

    def generate_inputs(self, mllm: nn.Module, input_ids: torch.Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        """The MLLM's `generate` keyword arguments for one prompt and its image inputs, placed and typed."""
        ...

    def largest_image_side(self, mllm_config: Any, cfg: ModelConfig) -> int:
        """The side of the largest square image the model sees whole (planning for images of any size)."""
        ...

    #: whether `frozen_image_features` exists: the frozen part of image encoding can be computed apart and
    #: handed to `decoder_states` as `inputs["image_features"]` (the disk feature cache)
    vision_cacheable: bool


def embedding_device(mllm: nn.Module) -> torch.device:
    """Where the input embedding lives (its first parameter's device).

    Never `get_input_embeddings().weight`: on PEFT's trainable-token wrapper that attribute builds the merged
    vocab x hidden matrix (a full copy per call), and under ZeRO-3 it reads a partitioned weight outside the
    module's forward, which fails.
    """
    return next(mllm.get_input_embeddings().parameters()).device


def row_token_index(
    input_ids: torch.Tensor, image_token_id: int, row_image: torch.Tensor, n_embeddings: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row's image embeddings come from, when rows share images.

    Args:
        input_ids: (B, L) the rows, each with its image's placeholder tokens.
        image_token_id: the placeholder token.
        row_image: (B,) which image each row shows; every image is shown by at least one row.
        n_embeddings: how many embeddings the vision pass gave for all images together (in image order).

    Returns:
        (the (B, L) placeholder mask, the index into the images' embeddings that fills those placeholders in
        row-major order). An image's share of the embeddings is the placeholder count of a row showing it.
    """
    placeholders = input_ids == image_token_id
    per_row = placeholders.sum(dim=1).tolist()
    images = row_image.tolist()
    counts: dict[int, int] = {}
    for row, image in enumerate(images):
        if counts.setdefault(image, per_row[row]) != per_row[row]:
            raise ValueError(f"rows showing image {image} hold {counts[image]} and {per_row[row]} image tokens")
    if sorted(counts) != list(range(len(counts))) or sum(counts.values()) != n_embeddings:
        raise ValueError(
            f"the rows show images {sorted(counts)} with {sum(counts.values())} image tokens, but the vision pass "
            f"gave {n_embeddings} embeddings: every image of the batch must be shown by a row"
        )
    starts = [0]
    for image in range(len(counts) - 1):
        starts.append(starts[-1] + counts[image])
    index = torch.cat([torch.arange(starts[i], starts[i] + counts[i]) for i in images])
    return placeholders, index.to(input_ids.device)


def vocab_size(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """Rows of the embedding and LM head.

    `model.text.vocab_size` fixes it (the real configs do: the released vocabulary, Sa2VA's added tokens
    included, so a size report or a meta-device build needs no tokenizer files); unset, it is
    `len(tokenizer)`. A tokenizer read from a folder (`model.path` / `model.tokenizer_path`) must have
    exactly that many tokens, so a checkpoint never loads into a resized or mismatched head; the tiny
    built-in tokenizer only has to fit (its ids then stand in for the release's).
    """
    configured = cfg.text.get("vocab_size")
    have = len(tokenizer)
    if configured is None:
        return have
    configured = int(configured)
    from_folder = cfg.tokenizer_path or cfg.path
    if from_folder is not None and have != configured:
        raise ValueError(
            f"model.text.vocab_size={configured} (model={cfg.name}) but the tokenizer in {from_folder} has {have} "
            "tokens (Sa2VA tokens included): use the config that matches this checkpoint, or set "
            "model.text.vocab_size=null to size the vocabulary from the tokenizer (a base MLLM without [SEG])"
        )
    if have > configured:
        raise ValueError(f"model.text.vocab_size={configured} is smaller than the tokenizer ({have} tokens)")
    return configured


class InternVLFamily:
    """InternVL2.5 / InternVL3 on transformers' native `InternVLForConditionalGeneration`."""

    name = "internvl"
    vision_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_prefix = "model.language_model."
    # InternVL's image tokens are not in the Qwen2 / InternLM2 vocabularies: Sa2VA adds them with its own.
    added_tokens = (*IMAGE_TOKENS, *SA2VA_ADDED_TOKENS)

    def make_config(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> InternVLConfig:
        """The transformers config: vocabulary from the tokenizer, image token id from `<IMG_CONTEXT>`."""
        text = dict(cfg.text)
        model_type = text.pop("model_type", "qwen2")
        text["vocab_size"] = vocab_size(cfg, tokenizer)
        text["tie_word_embeddings"] = cfg.tie_word_embeddings
        vision = dict(cfg.vision)
        patch = vision.get("patch_size", 14)
        size = vision.get("image_size", 448)
        patch, size = (
            (patch[0] if isinstance(patch, list | tuple) else patch),
            (size[0] if isinstance(size, list | tuple) else size),
        )
        tokens_per_tile = int((size // patch) ** 2 * cfg.downsample_ratio**2)
        config = InternVLConfig(
            vision_config=vision,
            text_config=AutoConfig.for_model(model_type, **text),
            image_token_id=token_id(tokenizer, IMG_CONTEXT_TOKEN),
            image_seq_length=tokens_per_tile,
            downsample_ratio=cfg.downsample_ratio,
            projector_hidden_act=cfg.projector_hidden_act,
            tie_word_embeddings=cfg.tie_word_embeddings,
        )
        config._attn_implementation = cfg.attn_implementation
        return config

    def build(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module:
        config = self.make_config(cfg, tokenizer)
        return InternVLForConditionalGeneration(config)

    def text_hidden_size(self, mllm: nn.Module) -> int:
        return int(mllm.config.text_config.hidden_size)

    @staticmethod
    def tile_size(mllm_config: InternVLConfig) -> int:
        size = mllm_config.vision_config.image_size
        return int(size[0] if isinstance(size, list | tuple) else size)

    def image_inputs(
        self, mllm_config: InternVLConfig, cfg: ModelConfig, image: Image.Image
    ) -> tuple[dict[str, torch.Tensor], str]:
        tiles = internvl_tiles(image, self.tile_size(mllm_config), max_tiles=cfg.max_tiles)
        placeholder = IMG_CONTEXT_TOKEN * (mllm_config.image_seq_length * tiles.shape[0])
        return {"pixel_values": tiles}, f"{IMG_START_TOKEN}{placeholder}{IMG_END_TOKEN}"

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        # Tiles of all samples go into one batch; the placeholders in input_ids keep their order.
        return {"pixel_values": torch.cat([item["pixel_values"] for item in items])}

    vision_cacheable = True

    def frozen_image_features(self, mllm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen part of InternVL's image encoding, (tiles, tokens, 4 x vision width): the vision tower at
        the configured layer, the class token dropped, pixel shuffle. Only the projector (trained) is left, as
        transformers' `get_image_features` computes it."""
        base = mllm.model
        vision = base.vision_tower
        pixels = normalise(pixel_values.to(next(vision.parameters()).device), IMAGENET_MEAN, IMAGENET_STD)
        config = mllm.config
        layer = config.vision_feature_layer
        with torch.no_grad():
            out = vision(pixel_values=pixels.to(base.dtype), return_dict=True, output_hidden_states=layer != -1)
            features = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
            if config.vision_feature_select_strategy == "default":
                features = features[:, 1:, :]
            side = int(features.shape[1] ** 0.5)
            features = features.reshape(features.shape[0], side, side, -1)
            features = base.pixel_shuffle(features, scale_factor=config.downsample_ratio)
        return features.reshape(features.shape[0], -1, features.shape[-1]).detach()

    def decoder_states(
        self,
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = embedding_device(mllm)
        if "image_features" in inputs:  # the frozen part already computed (feature cache): the projector only
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            projector = mllm.model.multi_modal_projector
            features = inputs["image_features"].to(next(projector.parameters()).device)
            image = BaseModelOutputWithPooling(pooler_output=projector(features))
            out = mllm.model(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                mm_encoder_outputs={"image": image},
                use_cache=False,
            )
            return out.last_hidden_state
        pixel_values = inputs["pixel_values"]
        vision = mllm.model.vision_tower
        pixel_values = normalise(pixel_values.to(next(vision.parameters()).device), IMAGENET_MEAN, IMAGENET_STD)
        pixel_values = pixel_values.to(mllm.model.dtype)
        if row_image is not None:
            return self._shared_image_states(
                mllm, input_ids.to(device), attention_mask.to(device), pixel_values, row_image
            )
        out = mllm.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values,
            use_cache=False,
        )
        return out.last_hidden_state

    @staticmethod
    def _shared_image_states(
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        row_image: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder over rows that share images: vision tower + pixel shuffle + projector once per image.

        The same steps as `InternVLModel.forward` (token embeddings, image embeddings scattered into the
        `<IMG_CONTEXT>` placeholders, the language model), with the image embeddings gathered per row.
        """
        model = mllm.model
        features = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        embeddings = getattr(features, "pooler_output", features)  # an output object (transformers >= 5.17)
        embeddings = embeddings.reshape(-1, embeddings.shape[-1])  # (tiles x tokens per tile, D), images in order
        placeholders, index = row_token_index(input_ids, mllm.config.image_token_id, row_image, embeddings.shape[0])
        inputs_embeds = model.get_input_embeddings()(input_ids)
        rows = embeddings.to(inputs_embeds.device, inputs_embeds.dtype)[index.to(inputs_embeds.device)]
        inputs_embeds = inputs_embeds.masked_scatter(placeholders[..., None].to(inputs_embeds.device), rows)
        out = model.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def lm_head(self, mllm: nn.Module) -> nn.Module:
        return mllm.lm_head

    def input_embeddings(self, mllm: nn.Module) -> nn.Embedding:
        return mllm.get_input_embeddings()

    def generate_inputs(self, mllm: nn.Module, input_ids: torch.Tensor, inputs: dict[str, Any]) -> dict[str, Any]:
        vision = next(mllm.model.vision_tower.parameters())
        pixels = normalise(inputs["pixel_values"].to(vision.device), IMAGENET_MEAN, IMAGENET_STD)
        return {"pixel_values": pixels.to(vision.dtype)}

    def largest_image_side(self, mllm_config: InternVLConfig, cfg: ModelConfig) -> int:
        cols = max(c for c in range(1, cfg.max_tiles + 1) if c * c <= cfg.max_tiles)
        return self.tile_size(mllm_config) * cols  # a square image at the largest square grid of tiles


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
    import transformers

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
    config_class: Any = None
    model_class: Any = None
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def make_config(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> Any:
        """The transformers config; vocabulary per `vocab_size`, vision token ids from the tokenizer."""
        text = dict(cfg.text)
        text.pop("model_type", None)
        text["vocab_size"] = vocab_size(cfg, tokenizer)
        text["tie_word_embeddings"] = cfg.tie_word_embeddings
        vocab = tokenizer.get_vocab()
        video = vocab.get(QWEN_VIDEO_PAD_TOKEN, token_id(tokenizer, QWEN_IMAGE_PAD_TOKEN))
        config = self.config_class(
            text_config=text,
            vision_config=dict(cfg.vision),
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
        self, mllm_config: Any, cfg: ModelConfig, image: Image.Image
    ) -> tuple[dict[str, torch.Tensor], str]:
        factor = int(cfg.image_factor)
        # qwen-vl-utils' first resize: multiple of `factor`, area within [4, 16384] * factor^2.
        height, width = smart_resize(image.height, image.width, factor, 4 * factor * factor, 16384 * factor * factor)
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        out = self.image_processor(mllm_config, cfg)(images=[image], return_tensors="pt")
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
        attention_mask: torch.Tensor,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = embedding_device(mllm)
        visual = mllm.model.visual
        vision_param = next(visual.parameters())
        input_ids = input_ids.to(device)
        if row_image is not None:
            return self._shared_image_states(mllm, input_ids, attention_mask.to(device), inputs, row_image)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask.to(device),
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
        attention_mask: torch.Tensor,
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
        placeholders, index = row_token_index(input_ids, mllm.config.image_token_id, row_image, embeddings.shape[0])
        inputs_embeds = model.get_input_embeddings()(input_ids)
        rows = embeddings.to(inputs_embeds.device, inputs_embeds.dtype)[index.to(inputs_embeds.device)]
        inputs_embeds = inputs_embeds.masked_scatter(placeholders[..., None].to(inputs_embeds.device), rows)
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


FAMILIES: dict[str, MLLMFamily] = {
    "internvl": InternVLFamily(),
    "qwen2_5_vl": Qwen25VLFamily(),
    "qwen3_vl": Qwen3VLFamily(),
}


def get_family(name: str) -> MLLMFamily:
    """The family called `name`, or an error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
