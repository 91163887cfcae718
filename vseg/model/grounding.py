"""SAM-2 as Sa2VA's grounding model: image features once per image, one mask per [SEG] embedding.

transformers' `Sam2Model.forward` takes no extra sparse prompts, so this module calls its parts: the
vision encoder (frozen), the prompt encoder (frozen, fed no points: it yields the two padding-point
embeddings and the no-mask dense embedding) and the mask decoder (trained). The [SEG] embedding is
appended to the sparse prompt, multimask output is on, and the mask with the highest predicted IoU is
kept, as in Sa2VA. Single images add the no-memory embedding and skip memory attention; runs (video) are
tracked with SAM-2's memory parts (`memory`, `vseg.model.tracking`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2Model

from vseg.model.preprocess import SAM_MEAN_BF16, SAM_STD_BF16, normalise


def mask_logits_at(logits: torch.Tensor, size: tuple[int, int], sam_size: int) -> torch.Tensor:
    """Low-res mask logits (N, h, w) -> float32 logits (N, H, W) at an image's size, as Sa2VA computes them.

    The authors' path goes through SAM-2's video predictor, which first upsamples the 256x256 logits to the
    SAM-2 input side (`sam_size`, 1024) and then to the image size, both bilinear with `align_corners=False`.
    One direct resize differs from theirs in ~0.5 % of pixels, exactly the edges where thin vessels live, so
    every mask at image size (prediction, validation metrics and overlays) goes through here.
    """
    x = logits[:, None].float()
    if tuple(x.shape[-2:]) != (sam_size, sam_size):
        x = F.interpolate(x, size=(sam_size, sam_size), mode="bilinear", align_corners=False)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return x[:, 0]


def masks_at(logits: torch.Tensor, size: tuple[int, int], sam_size: int, threshold: float = 0.5) -> torch.Tensor:
    """Boolean masks (N, H, W) at an image's size: `mask_logits_at`, then sigmoid > `threshold`."""
    return mask_logits_at(logits, size, sam_size).sigmoid() > threshold


@dataclass
class SamFeatures:
    """Per-image SAM-2 features ready for the mask decoder."""

    embeddings: torch.Tensor  # (B, C, h, w): lowest-resolution map with the no-memory embedding added
    high_res: list[torch.Tensor]  # two maps at 4x and 2x, already projected by the decoder's conv_s0/s1


class SamGrounding(nn.Module):
    """Wraps a transformers `Sam2Model`; every tensor is placed on the device of the part that uses it."""

    def __init__(self, sam: Sam2Model, memory: nn.Module | None = None):
        super().__init__()
        self.sam = sam
        self.memory = memory  # SAM-2's video memory (`vseg.model.tracking.SamMemory`); None: images only

    @property
    def image_size(self) -> int:
        return int(self.sam.config.prompt_encoder_config.image_size)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (256 for 1024-px SAM-2)."""
        return 4 * self.sam.prompt_encoder.image_embedding_size[0]

    def encode_backbone(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Frozen part: the Hiera trunk + FPN neck, (B, C, H, W) maps from high to low resolution."""
        encoder = self.sam.vision_encoder
        param = next(encoder.parameters())
        pixel_values = normalise(pixel_values.to(param.device), SAM_MEAN_BF16, SAM_STD_BF16).to(param.dtype)
        with torch.no_grad():
            out = encoder(pixel_values, return_dict=True)
        return [f.detach() for f in out.fpn_hidden_states]

    def project(self, backbone: list[torch.Tensor]) -> SamFeatures:
        """Trainable part of image encoding: the decoder's 1x1 projections of the high-res maps."""
        decoder = self.sam.mask_decoder
        device = decoder.conv_s0.weight.device
        f0, f1, f2 = (f.to(device) for f in backbone[: self.sam.num_feature_levels])
        no_mem = self.sam.no_memory_embedding.to(device=device, dtype=f2.dtype).view(1, -1, 1, 1)
        return SamFeatures(embeddings=f2 + no_mem, high_res=[decoder.conv_s0(f0), decoder.conv_s1(f1)])

    def encode(self, pixel_values: torch.Tensor) -> SamFeatures:
        """SAM-2 image features for a batch of (B, 3, S, S) normalised images."""
        return self.project(self.encode_backbone(pixel_values))

    def decode(
        self,
        features: SamFeatures,
        prompts: torch.Tensor,
        image_index: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits for each prompt.

        Args:
            features: per-image features from `encode`.
            prompts: (N, C) [SEG] embeddings already projected to the SAM prompt width.
            image_index: (N,) which image of `features` each prompt refers to.
            points: optional (N, P, 2) clicks as x, y in SAM-2 input pixels (0..image_size), sent through the
                prompt encoder next to the [SEG] embedding (refinement by clicks); None: Sa2VA's no-point prompt.
            labels: (N, P) 1 = foreground click, 0 = background click (with `points`).

        Returns:
            (N, h, w) low-resolution mask logits (h = w = `low_res_size`), the highest-IoU of the
            three multimask outputs for each prompt.
        """
        device = self.sam.mask_decoder.conv_s0.weight.device
        n = prompts.shape[0]
        if n == 0:
            size = self.low_res_size
            return prompts.new_zeros((0, size, size))
        image_index = image_index.to(device)
        masks, iou, _, _ = self.heads(
            features.embeddings[image_index], [h[image_index] for h in features.high_res], prompts, n, points, labels
        )
        # masks: (N, 1, 3, h, w), iou: (N, 1, 3). The choice is not differentiated, as in SAM-2.
        best = iou[:, 0].argmax(dim=-1)
        return masks[torch.arange(n, device=device), 0, best]

    def heads(
        self,
        embeddings: torch.Tensor,
        high_res: list[torch.Tensor],
        prompts: torch.Tensor | None,
        n: int,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder, multimask on; images, clicks and video frames all come here.

        Args:
            embeddings: (N, C, h, w) top-level features (no-memory embedding added, or memory-conditioned).
            high_res: the decoder's two projected high-resolution maps, N rows each.
            prompts: (N, C) embeddings appended to the sparse prompt, or None (a tracked video frame).
            points, labels: optional clicks (see `decode`); None: Sa2VA's no-point prompt.

        Returns:
            transformers' decoder outputs: masks (N, 1, 3, h, w), IoU (N, 1, 3), mask tokens (N, 1, 3, C),
            object scores.
        """
        decoder = self.sam.mask_decoder
        device = decoder.conv_s0.weight.device
        dtype = embeddings.dtype
        if points is None or labels is None:
            points = torch.zeros(n, 1, 1, 2, device=device, dtype=dtype)
            labels = -torch.ones(n, 1, 1, device=device, dtype=torch.int32)
        else:  # the prompt encoder pads a "not a point" entry itself (no boxes), as SAM-2 does for clicks
            points = points.to(device=device, dtype=dtype)[:, None]
            labels = labels.to(device=device, dtype=torch.int32)[:, None]
        encoder = self.sam.prompt_encoder
        sparse, dense = encoder(input_points=points, input_labels=labels, input_boxes=None, input_masks=None)
        sparse = sparse.to(dtype)
        if prompts is not None:
            sparse = torch.cat([sparse, prompts.to(device=device, dtype=dtype)[:, None, None, :]], dim=2)
        positional = self.sam.get_image_wide_positional_embeddings().to(device=device, dtype=dtype)
        return decoder(
            image_embeddings=embeddings.to(device),
            image_positional_embeddings=positional.expand(n, -1, -1, -1),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense.to(dtype),
            multimask_output=True,
            high_resolution_features=[h.to(device) for h in high_res],
        )


class BackboneCache:
    """Frozen SAM-2 backbone features per image key, computed on an image's first visit and reused after.

    The Hiera trunk + FPN neck is the largest frozen cost of a training step (1.9 TFLOP per 1024-px image),
    and without augmentation every repeat and epoch of an image feeds it the same pixels. Valid only while a
    key always maps to the same SAM-2 input: config validation refuses it with augmentation on.

    Args:
        where: "gpu" keeps the features on the device that computed them; "cpu" in (pinned) host memory,
            copied back per batch. A 1024-px Hiera-L image holds ~45 MB of bf16 features.
    """

    def __init__(self, where: str):
        if where not in ("gpu", "cpu"):
            raise ValueError(f"BackboneCache(where={where!r}): gpu | cpu")
        self.where = where
        self.store: dict[str, list[torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.store)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for levels in self.store.values() for t in levels)

    def features(self, keys: list[str], pixel_values: torch.Tensor, grounding: SamGrounding) -> list[torch.Tensor]:
        """`grounding.encode_backbone(pixel_values)`, computing only the images whose key is not stored yet."""
        if len(keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(keys)} keys for {pixel_values.shape[0]} images")
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in self.store:
                first.setdefault(key, i)
        if first:
            fresh = grounding.encode_backbone(pixel_values[list(first.values())])
            for j, key in enumerate(first):
                levels = [f[j] for f in fresh]
                if self.where == "cpu":
                    pin = levels[0].is_cuda
                    levels = [t.to("cpu").pin_memory() if pin else t.to("cpu", copy=True) for t in levels]
                else:
                    levels = [t.clone() for t in levels]  # not a view that keeps the whole batch alive
                self.store[key] = levels
        self.misses += len(first)
        self.hits += len(keys) - len(first)
        device = next(grounding.sam.vision_encoder.parameters()).device
        return [
            torch.stack([self.store[key][level] for key in keys]).to(device, non_blocking=True)
            for level in range(len(self.store[keys[0]]))
        ]


def unused_decoder_parameters(sam: Sam2Model) -> list[str]:
    """Names (relative to `sam`) of mask-decoder parameters that Sa2VA's losses never reach.

    With multimask output and no IoU / object-score loss, the IoU head, the object-score head and the
    single-mask hypernetwork get no gradient (their input tokens still do, through attention). Freezing them keeps DDP without `find_unused_parameters`.
    """
    prefixes = (
        "mask_decoder.iou_prediction_head.",
        "mask_decoder.pred_obj_score_head.",
        "mask_decoder.output_hypernetworks_mlps.0.",
    )
    return [name for name, _ in sam.named_parameters() if name.startswith(prefixes)]
