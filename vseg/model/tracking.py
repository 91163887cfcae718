"""SAM-2's video memory for Sa2VA: the [SEG] embedding prompts key frames, memory tracks it through a run.

Sa2VA's video mode (the authors' `predict_forward` with frames, their `SAM2VideoPredictor.add_language_embd`
and `propagate_in_video`), rebuilt on transformers' `sam2_video` parts:

1. **Key frames** (the authors: the first 5; here `key_frames`): each is an initial conditioning frame. Its
   image features get the no-memory embedding (no memory attention), the prompt encoder is fed no points, the
   [SEG] embedding is appended to the sparse prompt, the mask decoder runs with multimask on and the
   highest-IoU mask is kept. Unlike SAM-2's tracker the authors do *not* replace the logits of a frame whose
   object score is negative (their `torch.where` is commented out); neither does this.
2. The key frames' masks are encoded into memory (sigmoid x 20 - 10, memory encoder, stored in bfloat16).
3. **Every other frame**, from the first key frame on: memory attention over the key frames' memories
   (temporal slot 0), the last `num_maskmem - 1` tracked frames' memories and up to 16 object pointers
   (key frames in the past, then recent tracked frames; no temporal encoding on pointers, as released), then
   the same heads *without* a prompt embedding (SAM-2 tracks from memory alone), then its memory is encoded.

transformers' `Sam2VideoModel` does the same loop but accepts only points, boxes and masks as prompts, and
zeroes logits of absent objects; so the loop lives here and uses its memory modules (same weights, renamed:
`vseg.model.families.layout`). Memory is kept only as far back as it can still be read, so a long run costs the same
GPU memory per frame as a short one; frames come from a callback (CPU by default) one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Sam2Config
from transformers.models.sam2_video.configuration_sam2_video import Sam2VideoConfig
from transformers.models.sam2_video.modeling_sam2_video import (
    Sam2VideoFeedForward,
    Sam2VideoMemoryAttention,
    Sam2VideoMemoryEncoder,
)

from vseg.config.predict import KEY_FRAME_MODES
from vseg.model.preprocess import SAM_MEAN_BF16, SAM_STD_BF16, normalise

#: transformers' memory attention hard-codes cross-attention keys of width 64 (SAM-2's `mem_dim`), and an
#: object pointer of width C is split into C / 64 memory tokens: tracking needs fpn_hidden_size % 64 == 0.
MEMORY_DIM = 64


def memory_config(sam_config: Sam2Config, overrides: dict | None = None) -> Sam2VideoConfig | None:
    """The memory settings of Sa2VA's SAM-2 (2.0 Hiera-L: 4 layers, 7 memories, 16 pointers) for `sam_config`.

    None when the SAM-2 is too narrow for transformers' memory parts (see `MEMORY_DIM`): such a model predicts
    images only. `overrides` (`model.sam2.memory`) sets any `Sam2VideoConfig` memory field (tiny test models).
    """
    hidden = int(sam_config.vision_config.fpn_hidden_size)
    if hidden % MEMORY_DIM:
        return None
    fields = dict(
        num_maskmem=7,
        image_size=int(sam_config.prompt_encoder_config.image_size),
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        enable_occlusion_spatial_embedding=False,  # SAM 2.1 only
        enable_temporal_pos_encoding_for_object_pointers=False,  # Sa2VA: add_tpos_enc_to_obj_ptrs=False
        max_object_pointers_in_encoder=16,
        max_cond_frame_num=-1,
        memory_attention_hidden_size=hidden,
        memory_attention_num_layers=4,
        memory_attention_feed_forward_hidden_size=2048,
        memory_attention_rope_feat_sizes=list(sam_config.vision_config.backbone_feature_sizes[-1]),
        memory_encoder_hidden_size=hidden,
        memory_encoder_output_channels=MEMORY_DIM,
        mask_downsampler_embed_dim=hidden,
        memory_fuser_embed_dim=hidden,
        memory_fuser_intermediate_dim=4 * hidden,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    fields.update(overrides or {})
    config = Sam2VideoConfig(**fields)
    config._attn_implementation = getattr(sam_config, "_attn_implementation", None) or "sdpa"
    return config


WIDTH_FIELDS = (
    "model.sam2.vision_config.fpn_hidden_size",
    "model.sam2.prompt_encoder_config.hidden_size",
    "model.sam2.mask_decoder_config.hidden_size",
)


def narrow_sam(width: int) -> str | None:
    """Why a SAM-2 `width` channels wide (`fpn_hidden_size`) cannot track, or None when it can."""
    if width % MEMORY_DIM == 0:
        return None
    sizes = ", ".join(f"{f}={MEMORY_DIM * max(1, round(width / MEMORY_DIM))}" for f in WIDTH_FIELDS)
    return (
        f"this model has no SAM-2 memory weights: its SAM-2 is {width} channels wide "
        f"({WIDTH_FIELDS[0]}={width}; the tiny presets use 32 to stay small), and transformers' SAM-2 memory "
        f"attention needs a multiple of {MEMORY_DIM}. A model of this width predicts images only; for runs "
        f"build it wider ({sizes}; a new run for a trained model) or use a released Sa2VA folder"
    )


def tracking_unsupported(grounding) -> str | None:
    """Why `grounding` (a `SamGrounding`) cannot track a run, or None when it can."""
    if grounding.memory is not None:
        return None
    return narrow_sam(int(grounding.sam.config.vision_config.fpn_hidden_size)) or (
        "this model has no SAM-2 memory weights, so it cannot track a run: load a released Sa2VA folder "
        "(or an export of one) that carries grounding_encoder.sam2_model.memory_* tensors"
    )


class SamMemory(nn.Module):
    """SAM-2's memory parts (transformers' `Sam2VideoModel` names): what tracking adds to the image model."""

    def __init__(self, config: Sam2VideoConfig):
        super().__init__()
        self.config = config
        hidden, mem = config.memory_attention_hidden_size, config.memory_encoder_output_channels
        self.memory_attention = Sam2VideoMemoryAttention(config)
        self.memory_encoder = Sam2VideoMemoryEncoder(config)
        self.memory_temporal_positional_encoding = nn.Parameter(torch.zeros(config.num_maskmem, 1, 1, mem))
        self.no_object_pointer = nn.Parameter(torch.zeros(1, hidden))
        self.object_pointer_proj = Sam2VideoFeedForward(hidden, hidden, hidden, 3)
        # Loaded and written back so exports stay complete; Sa2VA's language-prompted tracking never runs them
        # (no mask prompts, directly added no-memory embedding).
        self.no_memory_positional_encoding = nn.Parameter(torch.zeros(1, 1, hidden))
        self.mask_downsample = nn.Conv2d(1, 1, kernel_size=4, stride=4)

    def encode(self, features: torch.Tensor, low_res: torch.Tensor, image_size: int) -> torch.Tensor:
        """A frame's memory (HW, B, mem) in bfloat16 from its raw top-level features and low-res mask logits."""
        high = F.interpolate(
            low_res[:, None].float(), size=(image_size, image_size), mode="bilinear", align_corners=False
        )
        config = self.config
        mask = torch.sigmoid(high) * config.sigmoid_scale_for_mem_enc + config.sigmoid_bias_for_mem_enc
        param = self.memory_encoder.projection.weight
        out, _ = self.memory_encoder(features.to(param.dtype), mask.to(param.dtype))
        # bfloat16 as SAM-2 stores it (the authors' and transformers' trackers both round here)
        return out.to(torch.bfloat16).flatten(2).permute(2, 0, 1)

    def position(self, like: torch.Tensor) -> torch.Tensor:
        """The memories' spatial encoding (HW, 1, mem); the same for every frame."""
        config = self.config
        h, w = config.memory_attention_rope_feat_sizes[1], config.memory_attention_rope_feat_sizes[0]
        shape = torch.Size((1, config.memory_encoder_output_channels, h, w))
        pos = self.memory_encoder.position_encoding(shape, like.device, like.dtype)
        return pos.flatten(2).permute(2, 0, 1)


@dataclass
class _Frame:
    logits: torch.Tensor  # (B, h, w) float32 low-res mask logits
    pointer: torch.Tensor  # (B, C) object pointer
    memory: torch.Tensor | None = None  # (HW, B, mem) bfloat16


def key_frame_indices(num_frames: int, count: int, mode: str) -> list[int]:
    """Which frames the MLLM sees: the first `count` (the authors' choice) or `count` spread evenly."""
    if mode not in KEY_FRAME_MODES:
        raise ValueError(f"key_frames={mode!r}: expected one of {KEY_FRAME_MODES}")
    count = max(1, min(count, num_frames))
    if mode == "first" or count == 1:
        return list(range(count))
    step = (num_frames - 1) / (count - 1)
    return sorted({round(i * step) for i in range(count)})


class Tracker:
    """Language-prompted SAM-2 tracking of one run (see the module docstring for the steps).

    Args:
        grounding: the model's `SamGrounding` with its `memory`.
        prompts: (B, C) [SEG] embeddings (already through `text_hidden_fcs`); each is tracked on its own.
        num_frames: frames in the run.
        key_frames: the conditioning frames, prompted with the embeddings.
        frame: frame index -> (3, S, S) uint8 SAM-2 input (wherever it is stored; moved here per frame).
    """

    def __init__(
        self,
        grounding,
        prompts: torch.Tensor,
        num_frames: int,
        key_frames: list[int],
        frame: Callable[[int], torch.Tensor],
    ):
        reason = tracking_unsupported(grounding)
        if reason is not None:
            raise ValueError(reason)
        if not key_frames or min(key_frames) < 0 or max(key_frames) >= num_frames:
            raise ValueError(f"key frames {key_frames} do not fit a run of {num_frames} frames")
        self.grounding, self.sam, self.memory = grounding, grounding.sam, grounding.memory
        self.prompts, self.num_frames, self.frame = prompts, num_frames, frame
        self.key_frames = sorted(set(key_frames))
        config = self.memory.config
        self.num_maskmem = config.num_maskmem
        self.max_pointers = min(num_frames, config.max_object_pointers_in_encoder)
        self.cond: dict[int, _Frame] = {}
        self.tracked: dict[int, _Frame] = {}

    # ------------------------------------------------------------------ one frame's parts
    def features(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(FPN levels (1, C, h, w) high to low resolution, the top level's position encoding (1, C, h, w))."""
        encoder = self.sam.vision_encoder
        param = next(encoder.parameters())
        pixels = self.frame(index).to(param.device, non_blocking=True)[None]
        pixels = normalise(pixels, SAM_MEAN_BF16, SAM_STD_BF16).to(param.dtype)
        out = encoder(pixels, return_dict=True)
        levels = list(out.fpn_hidden_states[: self.sam.num_feature_levels])
        return levels, out.fpn_position_encoding[self.sam.num_feature_levels - 1]

    def heads(self, image: torch.Tensor, levels: list[torch.Tensor], prompts: torch.Tensor | None) -> _Frame:
        """Mask decoder on (memory-conditioned) features: best-IoU logits and the object pointer."""
        n = self.prompts.shape[0]
        decoder = self.sam.mask_decoder
        high_res = [decoder.conv_s0(levels[0]).expand(n, -1, -1, -1), decoder.conv_s1(levels[1]).expand(n, -1, -1, -1)]
        masks, iou, tokens, scores = self.grounding.heads(image.expand(n, -1, -1, -1), high_res, prompts, n)
        best = iou[:, 0].argmax(dim=-1)
        rows = torch.arange(n, device=best.device)
        logits = masks[rows, 0, best].float()
        token = tokens[rows, 0, best]
        pointer = self.memory.object_pointer_proj(token.to(self.memory.no_object_pointer.dtype))
        appearing = (scores.reshape(n, -1)[:, :1] > 0).to(pointer.dtype)
        pointer = appearing * pointer + (1 - appearing) * self.memory.no_object_pointer
        return _Frame(logits, pointer)

    def conditioned(self, index: int, top: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The top-level features of a tracked frame after memory attention, (B, C, h, w)."""
        n, c, h, w = self.prompts.shape[0], *top.shape[1:]
        temporal = self.memory.memory_temporal_positional_encoding
        spatial = self.memory.position(top)
        memories, positions = [], []
        slots = [(0, out) for out in self.cond.values()]
        slots += [(d, self.tracked.get(index - d)) for d in range(self.num_maskmem - 1, 0, -1)]
        for offset, out in slots:
            if out is None or out.memory is None:
                continue
            memories.append(out.memory.to(top.device, non_blocking=True))
            positions.append((spatial + temporal[offset - 1]).expand(-1, n, -1))
        pointers = [(abs(index - t), out.pointer) for t, out in self.cond.items() if t <= index]
        for d in range(1, self.max_pointers):
            if index - d < 0:
                break
            if index - d in self.tracked:
                pointers.append((d, self.tracked[index - d].pointer))
        mem_dim = self.memory.config.memory_encoder_output_channels
        count = 0
        if pointers:
            stacked = torch.stack([p for _, p in pointers])  # (P, B, C)
            stacked = stacked.reshape(-1, n, c // mem_dim, mem_dim).permute(0, 2, 1, 3).flatten(0, 1)
            memories.append(stacked)
            positions.append(stacked.new_zeros(stacked.shape))
            count = stacked.shape[0]
        dtype = top.dtype
        memory = torch.cat([m.to(dtype) for m in memories])
        memory_pos = torch.cat([p.to(dtype) for p in positions])
        current = top.flatten(2).permute(2, 0, 1).expand(-1, n, -1)
        current_pos = position.to(dtype).flatten(2).permute(2, 0, 1).expand(-1, n, -1)
        out = self.memory.memory_attention(
            current_vision_features=current,
            memory=memory,
            current_vision_position_embeddings=current_pos,
            memory_posision_embeddings=memory_pos,
            num_object_pointer_tokens=count,
        )
        # (1, B, HW, C): transformers keeps a point-batch axis in front
        return out.transpose(0, 1).reshape(n, h * w, c).transpose(1, 2).reshape(n, c, h, w)

    # ------------------------------------------------------------------ the run
    @torch.inference_mode()
    def __iter__(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(frame index, (B, h, w) float32 low-res logits) for every frame from the first key frame on."""
        size = self.grounding.image_size
        no_memory = self.sam.no_memory_embedding
        tops: dict[int, torch.Tensor] = {}
        for k in self.key_frames:
            levels, _ = self.features(k)
            top = levels[-1]
            image = top + no_memory.to(device=top.device, dtype=top.dtype).view(1, -1, 1, 1)
            self.cond[k] = self.heads(image, levels, self.prompts)
            tops[k] = top
        for k in self.key_frames:  # the authors' propagate_in_video_preflight: encode once all are decoded
            self.cond[k].memory = self.memory.encode(
                tops[k].expand(self.prompts.shape[0], -1, -1, -1), self.cond[k].logits, size
            )
        del tops
        keep = max(self.num_maskmem, self.max_pointers)
        for t in range(self.key_frames[0], self.num_frames):
            if t in self.cond:
                yield t, self.cond[t].logits
                continue
            levels, position = self.features(t)
            image = self.conditioned(t, levels[-1], position)
            out = self.heads(image, levels, None)
            out.memory = self.memory.encode(levels[-1].expand(self.prompts.shape[0], -1, -1, -1), out.logits, size)
            self.tracked[t] = out
            self.tracked.pop(t - keep, None)  # older memories are never read again
            yield t, out.logits
