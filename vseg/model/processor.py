"""Sample -> model inputs, and samples -> batch. Training, validation and prediction all go through here.

One sample is an RGB image, a question, an optional answer (with one [SEG] per target mask) and optional
target masks. Labels supervise the answer and the template's closing suffix only. The prompt follows the
authors' code exactly, in one of two styles (`model.prompt_style`):

* `train` — Sa2VA's training data (`projects/sa2va/datasets`: the question is `"<image>\n" + question`, the
  `<image>` replaced by the family's markers, wrapped in the xtuner template of `model.template`): image
  markers, a newline, the question. The same for every family (the Qwen-VL ones train on the xtuner template
  too). vseg fine-tunes with this.
* `chat` — the released models' `predict_forward` with the README's `"<image>" + question`: InternVL puts
  `<img>...</img>` in place of `<image>` (the newline it appends is stripped), so the question follows
  `</img>` directly; Qwen-VL drops `<image>` and renders the processor's chat template with an image and a
  text part, whose markers are directly followed by the question too. When the tokenizer carries that chat
  template (a released Qwen folder does; Qwen2.5-VL's adds a default system turn) it is rendered as is;
  without one, the xtuner template of `model.template` stands in.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from vseg.config import ModelConfig
from vseg.model.families import MLLMFamily
from vseg.model.preprocess import check_resize, resize_mask, sam_pixels, to_pil
from vseg.model.sa2va import IGNORE_INDEX, find_positions
from vseg.model.tokenizer import (
    QWEN_IMAGE_PAD_TOKEN,
    QWEN_VISION_END_TOKEN,
    QWEN_VISION_START_TOKEN,
    SEG_TOKEN,
    get_template,
    token_id,
)

PROMPT_STYLES = ("train", "chat")
#: what a Qwen-VL chat template renders for one `{"type": "image"}` part
_QWEN_IMAGE_PART = f"{QWEN_VISION_START_TOKEN}{QWEN_IMAGE_PAD_TOKEN}{QWEN_VISION_END_TOKEN}"


class SampleError(ValueError):
    """A sample that cannot be turned into model inputs (the message names the sample)."""


@dataclass
class Sa2VAProcessor:
    """Turns samples into tensors for one built model.

    Args:
        tokenizer: the model's tokenizer (with the Sa2VA tokens).
        family: the MLLM family of the model.
        mllm_config: the transformers config of the MLLM (tile size, tokens per tile).
        model_cfg: vseg model settings (template, max tiles).
        sam_size: SAM-2 input side.
        mask_size: side of the low-res mask logits; targets are also kept at this size.
        max_length: longest allowed token sequence; longer samples are an error.
        resize: how images are resized, pil (the authors' resize) | torch (faster, within 1-2 grey levels;
            `vseg.model.preprocess`). Inference only: training always uses pil, so a fine-tuned model learns
            from the pixels inference gives it by default.
        pad_multiple: text is padded on the right to a multiple of this many tokens (training's
            `speed.cuda_graphs`: few shapes to record CUDA graphs for); 1 pads to the longest sample only.
    """

    tokenizer: PreTrainedTokenizerBase
    family: MLLMFamily
    mllm_config: Any
    model_cfg: ModelConfig
    sam_size: int
    mask_size: int
    max_length: int = 2048
    resize: str = "pil"
    pad_multiple: int = 1

    def __post_init__(self) -> None:
        check_resize(self.resize)

    @classmethod
    def for_model(
        cls,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        model_cfg: ModelConfig,
        max_length: int,
        resize: str = "pil",
    ):
        """The processor matching a built `Sa2VA` (tile size, SAM size and mask size read off the model)."""
        return cls(
            tokenizer=tokenizer,
            family=model.family,
            mllm_config=model.base_mllm.config,
            model_cfg=model_cfg,
            sam_size=model.grounding.image_size,
            mask_size=model.grounding.low_res_size,
            max_length=max_length,
            resize=resize,
        )

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, image_text: str, question: str) -> str:
        """The full prompt text (up to where the answer starts) for `model.prompt_style`; see the module doc."""
        template = get_template(self.model_cfg.template)
        style = getattr(self.model_cfg, "prompt_style", "train")
        if style == "train":
            return template.bos + template.instruction.format(input=f"{image_text}\n{question}")
        if style != "chat":
            raise ValueError(f"model.prompt_style={style!r}: expected one of {PROMPT_STYLES}")
        if QWEN_IMAGE_PAD_TOKEN in image_text and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if rendered.count(_QWEN_IMAGE_PART) != 1:
                raise ValueError(
                    f"the tokenizer's chat template renders an image as something other than {_QWEN_IMAGE_PART!r}; "
                    "use model.prompt_style=train or a Qwen-VL tokenizer folder"
                )
            return rendered.replace(_QWEN_IMAGE_PART, image_text)
        return template.bos + template.instruction.format(input=f"{image_text}{question}")

    def encode(
        self,
        image: np.ndarray | Image.Image,
        question: str,
        answer: str | None = None,
        masks: np.ndarray | None = None,
        sample_id: str = "?",
        pool: Executor | None = None,
    ) -> dict[str, Any]:
        """Features of one sample.

        Args:
            image: HxWx3 uint8 array or PIL image.
            question: the user's request, without image markers.
            answer: the supervised answer; None for inference (the prompt ends where the answer starts).
            masks: (K, H, W) or (H, W) boolean targets, one per [SEG] in `answer`.
            sample_id: shown in error messages.
            pool: if given, SAM-2's resize runs there while this thread makes the MLLM's tiles (PIL and torch release
                the GIL while they resize; one image's latency is then the longer resize, not their sum). Same pixels.
        """
        return self.encode_questions(image, [question], answer, masks, sample_id, pool)[0]

    def encode_questions(
        self,
        image: np.ndarray | Image.Image,
        questions: list[str],
        answer: str | None = None,
        masks: np.ndarray | None = None,
        sample_id: str = "?",
        pool: Executor | None = None,
    ) -> list[dict[str, Any]]:
        """Features of one image asked several questions (prediction with several targets), in their order.

        The image is tiled and resized once; the samples share those tensors and differ in their text.
        `pool`: as in `encode`.
        """
        pil = to_pil(image)
        template = get_template(self.model_cfg.template)
        sam_job = pool.submit(sam_pixels, pil, self.sam_size, self.resize) if pool is not None else None
        image_inputs, image_text = self.family.image_inputs(self.mllm_config, self.model_cfg, pil, self.resize)
        sam = sam_job.result() if sam_job is not None else sam_pixels(pil, self.sam_size, self.resize)
        answer_ids = self.token_ids(answer + template.suffix) if answer is not None else []
        out = []
        for question in questions:
            prompt_ids = self.token_ids(self.prompt(image_text, question))
            input_ids = prompt_ids + answer_ids
            if len(input_ids) > self.max_length:
                raise SampleError(
                    f"sample {sample_id}: {len(input_ids)} tokens exceed data.max_length={self.max_length} "
                    f"(image tokens: {image_text.count('<IMG_CONTEXT>')}); raise max_length or lower model.max_tiles"
                )
            labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            features: dict[str, Any] = {
                "id": sample_id,
                "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long),
                "sam_pixel_values": sam,
                "mllm_inputs": image_inputs,
                "image_size": (pil.height, pil.width),
            }
            if masks is not None:
                features.update(self._mask_features(masks, answer, pil, sample_id))
            out.append(features)
        return out

    def _mask_features(
        self, masks: np.ndarray, answer: str | None, pil: Image.Image, sample_id: str
    ) -> dict[str, torch.Tensor]:
        masks = masks[None] if masks.ndim == 2 else masks
        n_seg = (answer or "").count(SEG_TOKEN)
        if masks.shape[0] != n_seg:
            raise SampleError(f"sample {sample_id}: {masks.shape[0]} masks but {n_seg} {SEG_TOKEN} in the answer")
        if masks.shape[1:] != (pil.height, pil.width):
            raise SampleError(f"sample {sample_id}: mask {masks.shape[1:]} != image {(pil.height, pil.width)}")
        return {
            "masks": torch.from_numpy(masks.astype(bool)),
            "masks_low_res": torch.stack([resize_mask(m, (self.mask_size, self.mask_size)) for m in masks]),
        }

    def pad_text(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, labels, attention_mask) of the samples, padded on the right to the longest, rounded up to a
        multiple of `pad_multiple`. Right padding changes no real token's result: attention is causal, pads get
        attention 0 and label -100."""
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has no pad token")
        length = max(s["input_ids"].shape[0] for s in samples)
        length += -length % max(1, self.pad_multiple)
        batch_size = len(samples)
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
        for i, s in enumerate(samples):
            n = s["input_ids"].shape[0]
            input_ids[i, :n] = s["input_ids"]
            labels[i, :n] = s["labels"]
            attention_mask[i, :n] = 1
        return input_ids, labels, attention_mask

    def collate(self, samples: list[dict[str, Any]], pin: bool = False) -> dict[str, Any]:
        """Pads text on the right, stacks SAM images, batches the family's image inputs.

        Masks stay a list (one (K, H, W) tensor per sample, sizes may differ); `masks_low_res` is
        concatenated in [SEG] order, matching the order of the model's mask logits.
        `pin`: the SAM images (most of a batch's bytes) are stacked into page-locked memory (a CUDA build only).
        """
        input_ids, labels, attention_mask = self.pad_text(samples)
        batch: dict[str, Any] = {
            "ids": [s["id"] for s in samples],
            "image_ids": [s.get("image_id", s["id"]) for s in samples],  # which image (per-object samples share one)
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "sam_pixel_values": stack([s["sam_pixel_values"] for s in samples], pin),
            "mllm_inputs": self.family.collate([s["mllm_inputs"] for s in samples]),
            "image_sizes": [s["image_size"] for s in samples],
        }
        # Found here, in the loader's workers: the training step then gathers without waiting for the GPU.
        positions = find_positions(input_ids, labels, token_id(self.tokenizer, SEG_TOKEN))
        batch["seg_positions"], batch["answer_positions"] = positions.seg, positions.answer
        batch["num_tokens"] = int(attention_mask.sum())  # for throughput logs, known without asking the GPU
        batch["padded"] = batch["num_tokens"] < attention_mask.numel()  # training then passes no mask when False
        if all("content_keys" in s for s in samples):  # hashes of the encoders' inputs (disk feature cache)
            batch["content_keys"] = [s["content_keys"] for s in samples]
        if all("cached_features" in s for s in samples):  # that cache's entries on disk, read as the batch is pinned
            batch["cached_features"] = [s["cached_features"] for s in samples]
        if any("target" in s for s in samples):  # per_object validation: each sample's object name (per-target scores)
            batch["targets"] = [s.get("target") for s in samples]
        if any("pixel_spacing" in s for s in samples):  # mm per pixel at the sample's size (distances in mm)
            batch["pixel_spacings"] = [s.get("pixel_spacing") for s in samples]
        if any("fov" in s for s in samples):  # field of view: metrics count only inside it (None: everywhere)
            batch["fov"] = [torch.from_numpy(s["fov"]) if "fov" in s else None for s in samples]
        if all("masks" in s for s in samples):
            batch["masks"] = [s["masks"] for s in samples]
            batch["masks_low_res"] = torch.cat([s["masks_low_res"] for s in samples])
        return batch


def stack(tensors: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """`torch.stack`; with `pin` into page-locked memory from torch's caching host allocator.

    Why (the server's worker collates batches itself, not a DataLoader): a fresh 50 MB stack of 16 SAM images
    costs page faults on every batch, and a copy to the GPU from pageable memory goes through a staging
    buffer. Cached pinned blocks are reused once the copies that read them are done, and copy at full speed.
    """
    if not pin:
        return torch.stack(tensors)
    first = tensors[0]
    out = torch.empty((len(tensors), *first.shape), dtype=first.dtype, pin_memory=True)
    return torch.stack(tensors, out=out)
