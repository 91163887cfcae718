"""The InternVL family (InternVL2.5 / InternVL3 MLLMs; Qwen2, Llama or InternLM2 LLM): Sa2VA 1B/4B/8B/26B, v2 2B/8B/14B.

Everything that is InternVL about a Sa2VA model lives here: the transformers model it builds on
(`InternVLForConditionalGeneration`), its added tokens, image tiles and prompt placeholders; the released
layout (official <-> native keys, `Sa2VAChatConfig` <-> `ModelConfig` fields) is in `internvl_release` next
to it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from vseg.config import ModelConfig
from vseg.model.families.base import decoder_mask, embedding_device, shared_image_embeds, vocab_size
from vseg.model.families.internvl_release import (
    INTERNVL_BASE_MODEL_TYPES,
    InternVLLayout,
    architecture_from_config,
    config_from_architecture,
    full_architecture,
    release_llm_architecture,
)
from vseg.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, internvl_tiles, normalise
from vseg.model.tokenizer import (
    IMAGE_TOKENS,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    SA2VA_ADDED_TOKENS,
    token_id,
)


class InternVLFamily:
    """InternVL2.5 / InternVL3 on transformers' native `InternVLForConditionalGeneration`."""

    name = "internvl"
    vision_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_prefix = "model.language_model."
    # InternVL's image tokens are not in the Qwen2 / InternLM2 vocabularies: Sa2VA adds them with its own.
    added_tokens = (*IMAGE_TOKENS, *SA2VA_ADDED_TOKENS)
    release_architecture = "Sa2VAChatModel"
    processor_files: tuple[str, ...] = ()  # the InternVL releases preprocess in the authors' code

    def make_config(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> InternVLConfig:
        """The transformers config: vocabulary from the tokenizer, image token id from `<IMG_CONTEXT>`."""
        text = copy.deepcopy(dict(cfg.text))  # transformers may write into what it is given (see build.sam2_config)
        model_type = text.pop("model_type", "qwen2")
        text["vocab_size"] = vocab_size(cfg, tokenizer)
        text["tie_word_embeddings"] = cfg.tie_word_embeddings
        vision = copy.deepcopy(dict(cfg.vision))
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
        self, mllm_config: InternVLConfig, cfg: ModelConfig, image: Image.Image, resize: str = "pil"
    ) -> tuple[dict[str, torch.Tensor], str]:
        tiles = internvl_tiles(image, self.tile_size(mllm_config), max_tiles=cfg.max_tiles, resize=resize)
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
        attention_mask: torch.Tensor | None,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = embedding_device(mllm)
        input_ids = input_ids.to(device)
        mask = decoder_mask(attention_mask, device, mllm.config.text_config)
        if "image_features" in inputs:  # the frozen part already computed (feature cache): the projector only
            projector = mllm.model.multi_modal_projector
            embeddings = projector(inputs["image_features"].to(next(projector.parameters()).device))
            return self._language_states(mllm, input_ids, mask, embeddings)
        pixel_values = inputs["pixel_values"]
        vision = mllm.model.vision_tower
        pixel_values = normalise(pixel_values.to(next(vision.parameters()).device), IMAGENET_MEAN, IMAGENET_STD)
        pixel_values = pixel_values.to(mllm.model.dtype)
        if row_image is not None:
            return self._shared_image_states(mllm, input_ids, mask, pixel_values, row_image)
        return self._language_states(mllm, input_ids, mask, self._image_embeddings(mllm, pixel_values))

    @staticmethod
    def _image_embeddings(mllm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles x tokens per tile, D): vision tower, pixel shuffle and projector of every tile, in order."""
        features = mllm.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        embeddings = getattr(features, "pooler_output", features)  # an output object (transformers >= 5.17)
        return embeddings.reshape(-1, embeddings.shape[-1])

    @staticmethod
    def _language_states(mllm: nn.Module, input_ids: torch.Tensor, mask: Any, embeddings: torch.Tensor) -> torch.Tensor:
        """The language model over the token embeddings with `embeddings` scattered into the `<IMG_CONTEXT>`
        placeholders in order: the steps of `InternVLModel.forward`, made here for two reasons. Its placeholder
        check compares a count on the GPU with a host number, a wait for the GPU in every step; vseg's processor
        writes exactly `image_seq_length` placeholders per tile, so the count holds by construction (and a short
        source fails in `masked_scatter`). And its way of taking precomputed image features changed within
        transformers 5 (5.17 has no `mm_encoder_outputs`: a cached feature passed so is silently dropped)."""
        model = mllm.model
        inputs_embeds = model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == mllm.config.image_token_id)[..., None]
        rows = embeddings.reshape(-1, embeddings.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(placeholders, rows)
        out = model.language_model(inputs_embeds=inputs_embeds, attention_mask=mask, use_cache=False)
        return out.last_hidden_state

    @staticmethod
    def _shared_image_states(
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: Any,
        pixel_values: torch.Tensor,
        row_image: torch.Tensor,
    ) -> torch.Tensor:
        """The decoder over rows that share images: vision tower + pixel shuffle + projector once per image.

        The same steps as `InternVLModel.forward` (token embeddings, image embeddings scattered into the
        `<IMG_CONTEXT>` placeholders, the language model), with the image embeddings gathered per row.
        """
        model = mllm.model
        embeddings = InternVLFamily._image_embeddings(mllm, pixel_values)  # tiles x tokens per tile, images in order
        inputs_embeds, placeholders, index = shared_image_embeds(
            model.get_input_embeddings(), input_ids, mllm.config.image_token_id, row_image, embeddings
        )
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

    # ---- released checkpoints ---------------------------------------------------------------------------------
    def reads_config(self, config: Mapping[str, Any]) -> bool:
        return isinstance(config.get("llm_config"), Mapping) or config.get("model_type") in INTERNVL_BASE_MODEL_TYPES

    def architecture_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return architecture_from_config(config)

    def layout(
        self, cfg: ModelConfig, *, with_grounding: bool = True, llm_architecture: str | None = None
    ) -> InternVLLayout:
        heads = int(cfg.text["num_attention_heads"])
        return InternVLLayout(
            llm_architecture or release_llm_architecture(cfg),
            heads,
            int(cfg.text.get("num_key_value_heads") or heads),
            with_grounding=with_grounding,
        )

    def official_config(
        self, mllm_config: InternVLConfig, cfg: ModelConfig, *, vocab_size: int, dtype: str
    ) -> dict[str, Any]:
        vision, text = full_architecture(mllm_config, cfg)
        return config_from_architecture(
            vision,
            text,
            downsample_ratio=cfg.downsample_ratio,
            template=cfg.template,
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            vocab_size=vocab_size,
            llm_architecture=release_llm_architecture(cfg),
            max_tiles=cfg.max_tiles,
            dtype=dtype,
        )

    def release_config(self, config: Mapping[str, Any], *, vocab_size: int, dtype: str) -> dict[str, Any]:
        out = json.loads(json.dumps(config))  # a deep copy of plain JSON values
        out["llm_config"].update(vocab_size=vocab_size, torch_dtype=dtype)
        out["torch_dtype"] = dtype
        return out
