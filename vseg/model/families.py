"""MLLM families: everything that differs between InternVL and the Qwen-VL models, behind one interface.

A family builds its transformers model from `ModelConfig`, turns an image into that model's inputs (and
says how many placeholder tokens the prompt needs), batches those inputs, and runs the decoder to the
last hidden state. `Sa2VA`, the data pipeline and the trainer only talk to this interface, so a new family
(Qwen2.5-VL, Qwen3-VL) is one more class here plus its config files.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration, PreTrainedTokenizerBase

from vseg.config import ModelConfig
from vseg.model.preprocess import internvl_tiles
from vseg.model.tokenizer import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, token_id


class MLLMFamily(Protocol):
    """The per-family operations Sa2VA needs."""

    name: str
    #: parameter-name prefixes (relative to the transformers model) of each part
    vision_prefix: str
    projector_prefix: str
    language_prefix: str

    def build(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> nn.Module: ...

    def text_hidden_size(self, mllm: nn.Module) -> int: ...

    def image_inputs(
        self, mllm_config: Any, cfg: ModelConfig, image: Image.Image
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Per-sample model inputs and the text that stands for the image in the prompt."""
        ...

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def decoder_states(
        self, mllm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor: ...

    def lm_head(self, mllm: nn.Module) -> nn.Module: ...

    def input_embeddings(self, mllm: nn.Module) -> nn.Embedding: ...


class InternVLFamily:
    """InternVL2.5 / InternVL3 on transformers' native `InternVLForConditionalGeneration`."""

    name = "internvl"
    vision_prefix = "model.vision_tower."
    projector_prefix = "model.multi_modal_projector."
    language_prefix = "model.language_model."

    def make_config(self, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> InternVLConfig:
        """The transformers config: vocabulary from the tokenizer, image token id from `<IMG_CONTEXT>`."""
        text = dict(cfg.text)
        model_type = text.pop("model_type", "qwen2")
        text.setdefault("vocab_size", len(tokenizer))
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

    def decoder_states(
        self, mllm: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        embeddings = mllm.get_input_embeddings()
        device = embeddings.weight.device if hasattr(embeddings, "weight") else input_ids.device
        pixel_values = inputs["pixel_values"]
        vision = mllm.model.vision_tower
        pixel_values = pixel_values.to(device=next(vision.parameters()).device, dtype=mllm.model.dtype)
        out = mllm.model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            pixel_values=pixel_values,
            use_cache=False,
        )
        return out.last_hidden_state

    def lm_head(self, mllm: nn.Module) -> nn.Module:
        return mllm.lm_head

    def input_embeddings(self, mllm: nn.Module) -> nn.Embedding:
        return mllm.get_input_embeddings()


FAMILIES: dict[str, MLLMFamily] = {"internvl": InternVLFamily()}


def get_family(name: str) -> MLLMFamily:
    """The family called `name`, or an error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]
