"""The released Sa2VA key layout every family shares, and the machinery that maps keys in both directions.

Official tensors become the keys of an unwrapped `Sa2VA` module (`mllm.*`, `grounding.sam.*`,
`grounding.memory.*`, `text_hidden_fcs.*`) and back. Most keys are renames (tables of template pairs, `Rule`);
a few change shape, handled in code: SAM-2's four `point_embeddings.N` rows become one `point_embed` matrix
and its random-Fourier matrix feeds two buffers (here, shared by every family); the families add their own
(InternViT's fused `qkv`, InternLM2's `wqkv`) in `ReleaseLayout._own_to_native` / `_own_to_official`.

SAM-2 (`grounding_encoder.sam2_model.*`, the original SAM-2 names) is the same in every release. Its
video-memory parts (memory attention and encoder, object pointers) map onto `grounding.memory.*`
(transformers' `Sam2VideoModel` names, `vseg.model.tracking`); a model without memory (a SAM-2 too narrow
for it) drops them on import (`DROPPED_SAM2_PREFIXES`), and parts Sa2VA's SAM 2.0 never builds are always
dropped (`UNUSED_SAM2_PREFIXES`).

Conversions are pure tensor functions, so they also run on meta tensors: the loader checks every key and
shape of a folder before it reads a byte of weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache

import torch

VISION = "mllm.model.vision_tower."
PROJECTOR = "mllm.model.multi_modal_projector."
LANGUAGE = "mllm.model.language_model."
LM_HEAD = "mllm.lm_head."
SAM = "grounding.sam."
MEMORY = "grounding.memory."
OFFICIAL_SAM = "grounding_encoder.sam2_model."

#: official SAM-2 video-memory parts: loaded into `grounding.memory`, dropped by a model without memory
DROPPED_SAM2_PREFIXES = tuple(
    OFFICIAL_SAM + p
    for p in (
        "memory_attention.",
        "memory_encoder.",
        "mask_downsample.",
        "obj_ptr_proj.",
        "maskmem_tpos_enc",
        "no_mem_pos_enc",
        "no_obj_ptr",
    )
)
#: SAM 2.1 parts (temporal pointer projection, occlusion embedding) that Sa2VA's SAM 2.0 does not run
UNUSED_SAM2_PREFIXES = tuple(OFFICIAL_SAM + p for p in ("obj_ptr_tpos_proj.", "no_obj_embed_spatial"))

_S, _H = OFFICIAL_SAM, SAM
_M = MEMORY
_MA, _ME = _S + "memory_attention.", _S + "memory_encoder."
# SAM-2's mask downsampler is one Sequential (conv, norm, GELU) x 4 + a 1x1 conv; transformers names the stages.
_DOWNSAMPLER = [(str(3 * j), f"layers.{j}.conv") for j in range(4)]
_DOWNSAMPLER += [(str(3 * j + 1), f"layers.{j}.layer_norm") for j in range(4)] + [("12", "final_conv")]
_MEMORY_RULES = [
    (_MA + "layers.{i}.{a}.out_proj.{rest}", _M + "memory_attention.layers.{i}.{a}.o_proj.{rest}"),
    (_MA + "layers.{i}.norm{a}.{rest}", _M + "memory_attention.layers.{i}.layer_norm{a}.{rest}"),
    (_MA + "layers.{i}.{a}.{rest}", _M + "memory_attention.layers.{i}.{a}.{rest}"),
    (_MA + "norm.{rest}", _M + "memory_attention.layer_norm.{rest}"),
    *(
        (_ME + f"mask_downsampler.encoder.{i}.{{rest}}", _M + f"memory_encoder.mask_downsampler.{name}.{{rest}}")
        for i, name in _DOWNSAMPLER
    ),
    (_ME + "pix_feat_proj.{rest}", _M + "memory_encoder.feature_projection.{rest}"),
    (_ME + "fuser.layers.{i}.dwconv.{rest}", _M + "memory_encoder.memory_fuser.layers.{i}.depthwise_conv.{rest}"),
    (_ME + "fuser.layers.{i}.norm.{rest}", _M + "memory_encoder.memory_fuser.layers.{i}.layer_norm.{rest}"),
    (_ME + "fuser.layers.{i}.pwconv{a}.{rest}", _M + "memory_encoder.memory_fuser.layers.{i}.pointwise_conv{a}.{rest}"),
    (_ME + "fuser.layers.{i}.g_weight", _M + "memory_encoder.memory_fuser.layers.{i}.scale"),
    (_ME + "out_proj.{rest}", _M + "memory_encoder.projection.{rest}"),
    (_S + "maskmem_tpos_enc", _M + "memory_temporal_positional_encoding"),
    (_S + "no_mem_pos_enc", _M + "no_memory_positional_encoding"),
    (_S + "no_obj_ptr", _M + "no_object_pointer"),
    (_S + "obj_ptr_proj.layers.0.{rest}", _M + "object_pointer_proj.proj_in.{rest}"),
    (_S + "obj_ptr_proj.layers.1.{rest}", _M + "object_pointer_proj.layers.0.{rest}"),
    (_S + "obj_ptr_proj.layers.2.{rest}", _M + "object_pointer_proj.proj_out.{rest}"),
    (_S + "mask_downsample.{rest}", _M + "mask_downsample.{rest}"),
]
SAM2_RULES = [
    (_S + "image_encoder.trunk.patch_embed.proj.{rest}", _H + "vision_encoder.backbone.patch_embed.projection.{rest}"),
    (_S + "image_encoder.trunk.pos_embed", _H + "vision_encoder.backbone.pos_embed"),
    (_S + "image_encoder.trunk.pos_embed_window", _H + "vision_encoder.backbone.pos_embed_window"),
    (_S + "image_encoder.trunk.blocks.{i}.norm1.{rest}", _H + "vision_encoder.backbone.blocks.{i}.layer_norm1.{rest}"),
    (_S + "image_encoder.trunk.blocks.{i}.norm2.{rest}", _H + "vision_encoder.backbone.blocks.{i}.layer_norm2.{rest}"),
    (
        _S + "image_encoder.trunk.blocks.{i}.mlp.layers.0.{rest}",
        _H + "vision_encoder.backbone.blocks.{i}.mlp.proj_in.{rest}",
    ),
    (
        _S + "image_encoder.trunk.blocks.{i}.mlp.layers.1.{rest}",
        _H + "vision_encoder.backbone.blocks.{i}.mlp.proj_out.{rest}",
    ),
    (_S + "image_encoder.trunk.blocks.{i}.attn.{a}.{rest}", _H + "vision_encoder.backbone.blocks.{i}.attn.{a}.{rest}"),
    (_S + "image_encoder.trunk.blocks.{i}.proj.{rest}", _H + "vision_encoder.backbone.blocks.{i}.proj.{rest}"),
    (_S + "image_encoder.neck.convs.{i}.conv.{rest}", _H + "vision_encoder.neck.convs.{i}.{rest}"),
    (_S + "no_mem_embed", _H + "no_memory_embedding"),
    (_S + "sam_prompt_encoder.not_a_point_embed.{rest}", _H + "prompt_encoder.not_a_point_embed.{rest}"),
    (_S + "sam_prompt_encoder.no_mask_embed.{rest}", _H + "prompt_encoder.no_mask_embed.{rest}"),
    (_S + "sam_prompt_encoder.mask_downscaling.0.{rest}", _H + "prompt_encoder.mask_embed.conv1.{rest}"),
    (_S + "sam_prompt_encoder.mask_downscaling.1.{rest}", _H + "prompt_encoder.mask_embed.layer_norm1.{rest}"),
    (_S + "sam_prompt_encoder.mask_downscaling.3.{rest}", _H + "prompt_encoder.mask_embed.conv2.{rest}"),
    (_S + "sam_prompt_encoder.mask_downscaling.4.{rest}", _H + "prompt_encoder.mask_embed.layer_norm2.{rest}"),
    (_S + "sam_prompt_encoder.mask_downscaling.6.{rest}", _H + "prompt_encoder.mask_embed.conv3.{rest}"),
    (
        _S + "sam_mask_decoder.transformer.layers.{i}.{a}.out_proj.{rest}",
        _H + "mask_decoder.transformer.layers.{i}.{a}.o_proj.{rest}",
    ),
    (
        _S + "sam_mask_decoder.transformer.layers.{i}.norm{a}.{rest}",
        _H + "mask_decoder.transformer.layers.{i}.layer_norm{a}.{rest}",
    ),
    (
        _S + "sam_mask_decoder.transformer.layers.{i}.mlp.layers.0.{rest}",
        _H + "mask_decoder.transformer.layers.{i}.mlp.proj_in.{rest}",
    ),
    (
        _S + "sam_mask_decoder.transformer.layers.{i}.mlp.layers.1.{rest}",
        _H + "mask_decoder.transformer.layers.{i}.mlp.proj_out.{rest}",
    ),
    (_S + "sam_mask_decoder.transformer.layers.{i}.{a}.{rest}", _H + "mask_decoder.transformer.layers.{i}.{a}.{rest}"),
    (
        _S + "sam_mask_decoder.transformer.final_attn_token_to_image.out_proj.{rest}",
        _H + "mask_decoder.transformer.final_attn_token_to_image.o_proj.{rest}",
    ),
    (
        _S + "sam_mask_decoder.transformer.final_attn_token_to_image.{rest}",
        _H + "mask_decoder.transformer.final_attn_token_to_image.{rest}",
    ),
    (
        _S + "sam_mask_decoder.transformer.norm_final_attn.{rest}",
        _H + "mask_decoder.transformer.layer_norm_final_attn.{rest}",
    ),
    (_S + "sam_mask_decoder.output_upscaling.0.{rest}", _H + "mask_decoder.upscale_conv1.{rest}"),
    (_S + "sam_mask_decoder.output_upscaling.1.{rest}", _H + "mask_decoder.upscale_layer_norm.{rest}"),
    (_S + "sam_mask_decoder.output_upscaling.3.{rest}", _H + "mask_decoder.upscale_conv2.{rest}"),
    (_S + "sam_mask_decoder.{a}.{i}.layers.0.{rest}", _H + "mask_decoder.{a}.{i}.proj_in.{rest}"),
    (_S + "sam_mask_decoder.{a}.{i}.layers.1.{rest}", _H + "mask_decoder.{a}.{i}.layers.0.{rest}"),
    (_S + "sam_mask_decoder.{a}.{i}.layers.2.{rest}", _H + "mask_decoder.{a}.{i}.proj_out.{rest}"),
    (_S + "sam_mask_decoder.{a}.layers.0.{rest}", _H + "mask_decoder.{a}.proj_in.{rest}"),
    (_S + "sam_mask_decoder.{a}.layers.1.{rest}", _H + "mask_decoder.{a}.layers.0.{rest}"),
    (_S + "sam_mask_decoder.{a}.layers.2.{rest}", _H + "mask_decoder.{a}.proj_out.{rest}"),
    (_S + "sam_mask_decoder.{a}.{rest}", _H + "mask_decoder.{a}.{rest}"),
    *_MEMORY_RULES,
]
_POINT = re.compile(re.escape(OFFICIAL_SAM) + r"sam_prompt_encoder\.point_embeddings\.(\d+)\.weight")
_GAUSSIAN = OFFICIAL_SAM + "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
_NATIVE_POINT = SAM + "prompt_encoder.point_embed.weight"
_NATIVE_GAUSSIAN = (
    SAM + "prompt_encoder.shared_embedding.positional_embedding",
    SAM + "shared_image_embedding.positional_embedding",
)


@cache
def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    pattern = pattern.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{a\}", r"(?P<a>[A-Za-z0-9_]+)")
    pattern = pattern.replace(r"\{rest\}", r"(?P<rest>[A-Za-z0-9_.]+)")
    return re.compile(pattern)


@dataclass(frozen=True)
class Rule:
    official: str
    native: str

    def convert(self, key: str, to_native: bool) -> str | None:
        source, target = (self.official, self.native) if to_native else (self.native, self.official)
        match = _compile(source).fullmatch(key)
        return None if match is None else target.format(**match.groupdict())


@dataclass(frozen=True)
class Piece:
    """One native tensor (or, with `row`, one row of it) produced from an official tensor."""

    key: str
    tensor: torch.Tensor
    row: int | None = None  # the piece fills row `row` of `key` (SAM-2 point embeddings)


class ReleaseLayout:
    """What every released layout shares: SAM-2 (`grounding_encoder.sam2_model.*`) and `text_hidden_fcs.*`.

    Subclasses set `rules` (their rename table, SAM-2's appended) and may handle shape-changing keys of their
    own in `_own_to_native` / `_own_to_official`.
    """

    rules: list[Rule]
    with_grounding: bool = True
    #: the model has SAM-2 memory (`grounding.memory`); without it the memory tensors are dropped on import
    with_memory: bool = True
    #: official key of the LM head when the model ties it to the embedding (the remote code lists it anyway)
    tied_head_key: str = ""

    # ---- official -> native -------------------------------------------------------------------------------
    def is_dropped(self, key: str) -> bool:
        """True for official tensors vseg does not use (SAM 2.1 parts; video memory in a model without it)."""
        if not self.with_grounding:
            return False
        return key.startswith(UNUSED_SAM2_PREFIXES) or (not self.with_memory and key.startswith(DROPPED_SAM2_PREFIXES))

    def _own_to_native(self, key: str, tensor: torch.Tensor) -> list[Piece] | None:
        return None

    def to_native(self, key: str, tensor: torch.Tensor) -> list[Piece] | None:
        """The native pieces of one official tensor; None for a key this layout does not know."""
        pieces = self._own_to_native(key, tensor)
        if pieces is not None:
            return pieces
        if self.with_grounding:
            if m := _POINT.fullmatch(key):
                return [Piece(_NATIVE_POINT, tensor.reshape(-1), row=int(m.group(1)))]
            if key == _GAUSSIAN:
                return [Piece(name, tensor) for name in _NATIVE_GAUSSIAN]
        for rule in self.rules:
            native = rule.convert(key, to_native=True)
            if native is not None:
                return [Piece(native, tensor)]
        return None

    # ---- native -> official -------------------------------------------------------------------------------
    def _own_to_official(
        self, key: str, native: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]] | None:
        """Official pairs for a native key this layout treats specially (empty: part of another key's pair)."""
        return None

    def to_official(self, native: Mapping[str, torch.Tensor], tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
        """Official (key, tensor) pairs for a complete native state dict (unwrapped `Sa2VA` names).

        Raises:
            KeyError: naming a native key that has no official counterpart.
        """
        for key, tensor in native.items():
            own = self._own_to_official(key, native)
            if own is not None:
                yield from own
                continue
            if key == _NATIVE_POINT:
                for row in range(tensor.shape[0]):
                    yield f"{OFFICIAL_SAM}sam_prompt_encoder.point_embeddings.{row}.weight", tensor[row : row + 1]
                continue
            if key == _NATIVE_GAUSSIAN[1]:  # the image-wide one: it shapes every mask
                yield _GAUSSIAN, tensor
                continue
            if key == _NATIVE_GAUSSIAN[0]:
                continue
            for rule in self.rules:
                official = rule.convert(key, to_native=False)
                if official is not None:
                    yield official, tensor
                    break
            else:
                raise KeyError(f"native key {key!r} has no official Sa2VA counterpart")
        if tied and LM_HEAD + "weight" not in native:
            # The remote code unties nothing: its state dict lists the LM head even when it is tied.
            yield self.tied_head_key, native[LANGUAGE + "embed_tokens.weight"]
