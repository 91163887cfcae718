"""What every MLLM family provides (`MLLMFamily`), and the helpers the families share."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase

from vseg.config import ModelConfig
from vseg.model.families.layout import ReleaseLayout


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
        self, mllm_config: Any, cfg: ModelConfig, image: Image.Image, resize: str = "pil"
    ) -> tuple[dict[str, torch.Tensor], str]:
        """Per-sample model inputs and the text that stands for the image in the prompt; `resize`: pil | torch
        (`vseg.model.preprocess.RESIZE_METHODS`), for the resizes vseg makes itself."""
        ...

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]: ...

    def decoder_states(
        self,
        mllm: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        inputs: dict[str, Any],
        row_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Last-layer hidden states (B, L, D). `attention_mask` None: no padding (every token attends causally).

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

    # ---- the released checkpoints of this family (pure functions on key names and config dicts) ----------
    #: `architectures[0]` of this family's released Sa2VA config.json (the authors' remote-code class)
    release_architecture: str
    #: processor files a release ships next to its weights (exports copy them from the base release)
    processor_files: tuple[str, ...]

    def reads_config(self, config: Mapping[str, Any]) -> bool:
        """Whether a released (or base MLLM) config.json belongs to this family."""
        ...

    def architecture_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The `ModelConfig` architecture fields of a released config.json (ValueError when it is not one)."""
        ...

    def layout(
        self, cfg: ModelConfig, *, with_grounding: bool = True, llm_architecture: str | None = None
    ) -> ReleaseLayout:
        """The official <-> native key mapping for `cfg` (`llm_architecture`: the release's, when reading one)."""
        ...

    def official_config(self, mllm_config: Any, cfg: ModelConfig, *, vocab_size: int, dtype: str) -> dict[str, Any]:
        """The released config.json (what the authors' code reads) of a built model."""
        ...

    def release_config(self, config: Mapping[str, Any], *, vocab_size: int, dtype: str) -> dict[str, Any]:
        """A release's own config.json with the exported vocabulary size and dtype."""
        ...


def embedding_device(mllm: nn.Module) -> torch.device:
    """Where the input embedding lives (its first parameter's device).

    Never `get_input_embeddings().weight`: on PEFT's trainable-token wrapper that attribute builds the merged
    vocab x hidden matrix (a full copy per call), and under ZeRO-3 it reads a partitioned weight outside the
    module's forward, which fails.
    """
    return next(mllm.get_input_embeddings().parameters()).device


def to_device(mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """An attention mask on `device`; None (no padding) stays None. transformers then checks a given mask for
    padding, and the position ids for packed sequences when there is none: both wait for the GPU
    (`masking_utils`). The InternVL family avoids both with `decoder_mask`."""
    return None if mask is None else mask.to(device)


#: language models whose forward takes a ready mask per layer type (`{"full_attention": mask}`) and then builds none
MASK_MAPPING_MODELS = ("qwen2", "qwen3")


def decoder_mask(mask: torch.Tensor | None, device: torch.device, text_config: Any) -> Any:
    """The language model's attention mask for (B, L) right-padded rows, made so that nothing waits for the GPU.

    transformers' mask building reads the GPU from the host whenever it is asked to build one: with a 2-D mask it
    checks whether any token is padded, and without one it checks the position ids for packed sequences
    (`masking_utils`), a wait in every step either way. With SDPA and causal attention in every layer the masks
    it would build are known, and made here instead: for padded rows the (B, 1, L, L) booleans, causal and zero
    at padded keys, built on the device (a 4-D mask is used as given); right padding leaves every query row a
    key to attend to (its row's first token), so no row is all masked. For unpadded rows no mask at all (SDPA's
    own causal kernel), handed over as the ready per-layer-type mapping where the model takes one
    (`MASK_MAPPING_MODELS`), so that no packed-sequence check runs. Other attention implementations (eager adds
    a float mask, flash-attention unpads from the 2-D one), sliding-window layers and other models get what
    they got before: the 2-D mask, or None.
    """
    layer_types = getattr(text_config, "layer_types", None) or ()
    full_attention = all(t == "full_attention" for t in layer_types) and not getattr(
        text_config, "sliding_window", None
    )
    ours = getattr(text_config, "_attn_implementation", None) == "sdpa" and full_attention
    if mask is None:
        mapping = ours and getattr(text_config, "model_type", None) in MASK_MAPPING_MODELS
        return {"full_attention": None} if mapping else None
    mask = mask.to(device, non_blocking=True)
    if not ours:
        return mask
    length = mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return causal[None, None] & mask.bool()[:, None, None, :]


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


def shared_image_embeds(
    embed: nn.Module, input_ids: torch.Tensor, image_token_id: int, row_image: torch.Tensor, embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token embeddings of rows that share images, each image's embeddings (computed once, in image order)
    scattered into the placeholders of every row that shows it.

    Returns:
        (inputs_embeds (B, L, D), the (B, L) placeholder mask, the index of `row_token_index`).
    """
    placeholders, index = row_token_index(input_ids, image_token_id, row_image, embeddings.shape[0])
    inputs_embeds = embed(input_ids)
    rows = embeddings.to(inputs_embeds.device, inputs_embeds.dtype)[index.to(inputs_embeds.device)]
    return inputs_embeds.masked_scatter(placeholders[..., None].to(inputs_embeds.device), rows), placeholders, index


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
