"""The released Sa2VA layout (the authors' remote-code `Sa2VAChatModel`) <-> vseg's transformers-native names.

Two things are mapped, in both directions, by the same tables:

* **Keys.** Official tensors (`vision_model.*` InternViT, `mlp1.{0,1,3}`, `language_model.*` Qwen2 / Llama /
  InternLM2, `grounding_encoder.sam2_model.*` original SAM-2, `text_hidden_fcs.*`) become the keys of an
  unwrapped `Sa2VA` module (`mllm.model.vision_tower.*`, `mllm.model.multi_modal_projector.*`,
  `mllm.model.language_model.*`, `mllm.lm_head.*`, `grounding.sam.*`, `text_hidden_fcs.*`). Most are renames
  (one table of template pairs); a few change shape: InternViT's fused `attn.qkv` splits in thirds,
  InternLM2's `attention.wqkv` splits per GQA group (rows ordered `[q_0 .. q_{G-1}, k, v]` for every KV head),
  SAM-2's four `point_embeddings.N` rows become one `point_embed` matrix, and its random-Fourier matrix
  feeds two buffers. SAM-2's video-memory parts (memory attention and encoder, object pointers) map onto
  `grounding.memory.*` (transformers' `Sam2VideoModel` names, `vseg.model.tracking`); a model without memory
  (a SAM-2 too narrow for it) drops them on import (`DROPPED_SAM2_PREFIXES`; the loader logs what it dropped),
  and parts Sa2VA's SAM 2.0 never builds are always dropped (`UNUSED_SAM2_PREFIXES`).
* **config.json.** `Sa2VAChatConfig` (`vision_config` InternViT fields, `llm_config` with its architecture,
  `downsample_ratio`, `template`) <-> the architecture fields of `ModelConfig`.
* **Qwen-VL releases** (`Sa2VAChatModelQwen`, Qwen2.5-VL / Qwen3-VL): the wrapper keeps transformers' own
  `Qwen*VLForConditionalGeneration` as `model`, so `model.model.visual.*`, `model.model.language_model.*` and
  `model.lm_head.*` map onto vseg's MLLM by prefix (`QwenVLLayout`; the pre-4.52 `model.visual.*` /
  `model.model.*` names are read too); SAM-2 and `text_hidden_fcs` as above. Its config.json is the
  transformers Qwen-VL config with model_type `sa2va_chat` and a `template` (`qwen_architecture_from_config`,
  `qwen_config_from_mllm`).

Conversions are pure tensor functions, so they also run on meta tensors: the loader checks every key and
shape of a folder before it reads a byte of weights.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

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

#: LLM architectures of the release (`llm_config.architectures[0]`) -> transformers model_type vseg builds
LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "llama"}

# (official template, native template). `{i}` matches digits, `{a}` a module name, `{rest}` the remaining
# dotted path (".weight", ".bias", ...). Order matters: the first matching pair wins, in either direction.
_VISION_RULES = [
    ("vision_model.embeddings.class_embedding", VISION + "embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", VISION + "embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{rest}", VISION + "embeddings.patch_embeddings.projection.{rest}"),
    ("vision_model.encoder.layers.{i}.ls1", VISION + "encoder.layer.{i}.lambda_1"),
    ("vision_model.encoder.layers.{i}.ls2", VISION + "encoder.layer.{i}.lambda_2"),
    ("vision_model.encoder.layers.{i}.norm1.{rest}", VISION + "encoder.layer.{i}.layernorm_before.{rest}"),
    ("vision_model.encoder.layers.{i}.norm2.{rest}", VISION + "encoder.layer.{i}.layernorm_after.{rest}"),
    (
        "vision_model.encoder.layers.{i}.attn.proj.{rest}",
        VISION + "encoder.layer.{i}.attention.projection_layer.{rest}",
    ),
    ("vision_model.encoder.layers.{i}.attn.q_norm.{rest}", VISION + "encoder.layer.{i}.attention.q_norm.{rest}"),
    ("vision_model.encoder.layers.{i}.attn.k_norm.{rest}", VISION + "encoder.layer.{i}.attention.k_norm.{rest}"),
    ("vision_model.encoder.layers.{i}.mlp.{a}.{rest}", VISION + "encoder.layer.{i}.mlp.{a}.{rest}"),
    ("mlp1.0.{rest}", PROJECTOR + "layer_norm.{rest}"),
    ("mlp1.1.{rest}", PROJECTOR + "linear_1.{rest}"),
    ("mlp1.3.{rest}", PROJECTOR + "linear_2.{rest}"),
    ("text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}"),
]
# Qwen2 / Llama LLMs ship in transformers' own names.
_HF_LLM_RULES = [
    ("language_model.model.{rest}", LANGUAGE + "{rest}"),
    ("language_model.lm_head.{rest}", LM_HEAD + "{rest}"),
]
_INTERNLM2_RULES = [
    ("language_model.model.tok_embeddings.{rest}", LANGUAGE + "embed_tokens.{rest}"),
    ("language_model.model.layers.{i}.attention.wo.{rest}", LANGUAGE + "layers.{i}.self_attn.o_proj.{rest}"),
    ("language_model.model.layers.{i}.feed_forward.w1.{rest}", LANGUAGE + "layers.{i}.mlp.gate_proj.{rest}"),
    ("language_model.model.layers.{i}.feed_forward.w3.{rest}", LANGUAGE + "layers.{i}.mlp.up_proj.{rest}"),
    ("language_model.model.layers.{i}.feed_forward.w2.{rest}", LANGUAGE + "layers.{i}.mlp.down_proj.{rest}"),
    ("language_model.model.layers.{i}.attention_norm.{rest}", LANGUAGE + "layers.{i}.input_layernorm.{rest}"),
    ("language_model.model.layers.{i}.ffn_norm.{rest}", LANGUAGE + "layers.{i}.post_attention_layernorm.{rest}"),
    ("language_model.model.norm.{rest}", LANGUAGE + "norm.{rest}"),
    ("language_model.output.{rest}", LM_HEAD + "{rest}"),
]
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
_SAM2_RULES = [
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
# Special (shape-changing) keys, handled in code.
_VISION_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_NATIVE_VISION_Q = re.compile(re.escape(VISION) + r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")
_NATIVE_LLM_QKV = re.compile(re.escape(LANGUAGE) + r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
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
class _Rule:
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


def split_internlm2_wqkv(w: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2's fused `wqkv` (rows: for each KV head, its G query heads, then k, then v) -> q, k, v."""
    groups = num_heads // num_kv_heads
    head_dim = w.shape[0] // (num_heads + 2 * num_kv_heads)
    grouped = w.reshape(num_kv_heads, groups + 2, head_dim, *w.shape[1:])
    q = grouped[:, :groups].reshape(num_heads * head_dim, *w.shape[1:])
    k = grouped[:, groups].reshape(num_kv_heads * head_dim, *w.shape[1:])
    v = grouped[:, groups + 1].reshape(num_kv_heads * head_dim, *w.shape[1:])
    return q, k, v


def fuse_internlm2_wqkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int
) -> torch.Tensor:
    """Inverse of `split_internlm2_wqkv`."""
    groups = num_heads // num_kv_heads
    head_dim = q.shape[0] // num_heads
    tail = q.shape[1:]
    parts = [
        q.reshape(num_kv_heads, groups, head_dim, *tail),
        k.reshape(num_kv_heads, 1, head_dim, *tail),
        v.reshape(num_kv_heads, 1, head_dim, *tail),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


class _Layout:
    """What every released layout shares: SAM-2 (`grounding_encoder.sam2_model.*`) and `text_hidden_fcs.*`.

    Subclasses set `rules` (their rename table, SAM-2's appended) and may handle shape-changing keys of their
    own in `_own_to_native` / `_own_to_official`.
    """

    rules: list[_Rule]
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


class InternVLLayout(_Layout):
    """Key mapping of the InternVL-family release (InternVL2.5 / InternVL3; Qwen2, Llama or InternLM2 LLM).

    Args:
        llm_architecture: `llm_config.architectures[0]` of the release (a key of `LLM_ARCHITECTURES`).
        num_heads, num_kv_heads: of the LLM (InternLM2's `wqkv` split needs them).
        with_grounding: False for a plain InternVL base MLLM (no SAM-2, no `text_hidden_fcs`).
    """

    def __init__(self, llm_architecture: str, num_heads: int, num_kv_heads: int, with_grounding: bool = True):
        if llm_architecture not in LLM_ARCHITECTURES:
            raise ValueError(
                f"LLM architecture {llm_architecture!r} is not supported; known: {sorted(LLM_ARCHITECTURES)}"
            )
        self.llm_architecture = llm_architecture
        self.internlm2 = llm_architecture == "InternLM2ForCausalLM"
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.with_grounding = with_grounding
        self.tied_head_key = "language_model.output.weight" if self.internlm2 else "language_model.lm_head.weight"
        llm = _INTERNLM2_RULES if self.internlm2 else _HF_LLM_RULES
        rules = _VISION_RULES + llm + (_SAM2_RULES if with_grounding else [])
        if not with_grounding:
            rules = [(o, n) for o, n in rules if not o.startswith("text_hidden_fcs")]
        self.rules = [_Rule(o, n) for o, n in rules]

    def _own_to_native(self, key: str, tensor: torch.Tensor) -> list[Piece] | None:
        if m := _VISION_QKV.fullmatch(key):
            layer, kind = m.groups()
            q, k, v = tensor.chunk(3, dim=0)
            prefix = f"{VISION}encoder.layer.{layer}.attention."
            return [Piece(f"{prefix}{n}_proj.{kind}", t) for n, t in zip("qkv", (q, k, v), strict=True)]
        if self.internlm2 and (m := _WQKV.fullmatch(key)):
            layer, kind = m.groups()
            parts = split_internlm2_wqkv(tensor, self.num_heads, self.num_kv_heads)
            prefix = f"{LANGUAGE}layers.{layer}.self_attn."
            return [Piece(f"{prefix}{n}_proj.{kind}", t) for n, t in zip("qkv", parts, strict=True)]
        return None

    def _own_to_official(
        self, key: str, native: Mapping[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]] | None:
        if m := _NATIVE_VISION_Q.fullmatch(key):
            layer, which, kind = m.groups()
            if which != "q":
                return iter(())
            stem = f"{VISION}encoder.layer.{layer}.attention."
            qkv = torch.cat([native[f"{stem}{n}_proj.{kind}"] for n in "qkv"], dim=0)
            return iter([(f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}", qkv)])
        if self.internlm2 and (m := _NATIVE_LLM_QKV.fullmatch(key)):
            layer, which, kind = m.groups()
            if which != "q":
                return iter(())
            stem = f"{LANGUAGE}layers.{layer}.self_attn."
            q, k, v = (native[f"{stem}{n}_proj.{kind}"] for n in "qkv")
            fused = fuse_internlm2_wqkv(q, k, v, self.num_heads, self.num_kv_heads)
            return iter([(f"language_model.model.layers.{layer}.attention.wqkv.{kind}", fused)])
        return None


# Qwen-VL releases (`Sa2VAChatModelQwen`): `self.model` is transformers' Qwen2_5_VL / Qwen3VL
# ForConditionalGeneration, saved under the post-4.52 transformers names, so the MLLM maps one to one.
_QWEN_RULES = [
    ("model.model.visual.{rest}", "mllm.model.visual.{rest}"),
    ("model.model.language_model.{rest}", LANGUAGE + "{rest}"),
    ("model.lm_head.{rest}", LM_HEAD + "{rest}"),
    # Read only (the first pair above wins when writing): a wrapper saved with transformers < 4.52, whose
    # Qwen2.5-VL put the vision tower at `visual` and the decoder at `model`.
    ("model.visual.{rest}", "mllm.model.visual.{rest}"),
    ("model.model.{rest}", LANGUAGE + "{rest}"),
    ("text_hidden_fcs.{rest}", "text_hidden_fcs.{rest}"),
]


class QwenVLLayout(_Layout):
    """Key mapping of the Qwen2.5-VL / Qwen3-VL releases: `model.*` (the transformers MLLM, renamed by prefix
    only), `grounding_encoder.sam2_model.*` and `text_hidden_fcs.*` as in the InternVL releases."""

    tied_head_key = "model.lm_head.weight"

    def __init__(self, with_grounding: bool = True):
        self.with_grounding = with_grounding
        rules = _QWEN_RULES + (_SAM2_RULES if with_grounding else [])
        self.rules = [_Rule(o, n) for o, n in rules]


# ---- config.json <-> ModelConfig fields ----------------------------------------------------------------------

#: Sa2VAChatConfig top-level model_type / architectures that mean "a released Sa2VA (InternVL family)"
SA2VA_MODEL_TYPES = ("sa2va_chat",)
#: ... and "a plain InternVL base MLLM without [SEG], SAM-2 and text_hidden_fcs"
INTERNVL_BASE_MODEL_TYPES = ("internvl_chat",)

TEXT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
    "vocab_size",
)


def with_rope_parameters(text: Mapping[str, Any]) -> dict[str, Any]:
    """`text` with one transformers-5 `rope_parameters` dict, read from either spelling of a config.

    Folders saved by transformers 5 hold `rope_parameters` (and `rope_scaling: null`), older ones and the
    authors' remote code `rope_theta` + `rope_scaling`. A set `rope_parameters` wins; its theta may also sit
    next to it at the top level.
    """
    out = dict(text)
    theta, scaling, params = (
        out.pop("rope_theta", None),
        out.pop("rope_scaling", None),
        out.pop("rope_parameters", None),
    )
    if params:
        rope = _plain_rope(params)
        rope.setdefault("rope_type", rope.pop("type", "default"))
        if theta is not None:
            rope.setdefault("rope_theta", theta)
        out["rope_parameters"] = rope
        return out
    if theta is None:
        return out
    rope: dict[str, Any] = {"rope_type": "default"}
    if scaling:
        scaling = dict(scaling)
        rope["rope_type"] = scaling.pop("rope_type", None) or scaling.pop("type", "default")
        scaling.pop("type", None)
        rope.update(scaling)
    rope["rope_theta"] = theta
    out["rope_parameters"] = rope
    return out


def rope_theta_and_scaling(text: Mapping[str, Any]) -> dict[str, Any]:
    """The released config's `rope_theta` (+ `rope_scaling` unless default) from `rope_parameters`."""
    rope = dict(with_rope_parameters(text).get("rope_parameters") or {})
    out: dict[str, Any] = {}
    if "rope_theta" in rope:
        out["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    if kind != "default":
        out["rope_scaling"] = {"type": kind, **rope}
    return out


def _side(value: Any) -> int:
    return int(value[0] if isinstance(value, list | tuple) else value)


def architecture_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` architecture fields of an official InternVL-family `config.json`.

    Returns:
        {"family", "template", "downsample_ratio", "tie_word_embeddings", "vision": {...}, "text": {...}}
        plus "llm_architecture" (not a ModelConfig field; the key layout depends on it).
    """
    for part in ("vision_config", "llm_config"):
        if not isinstance(config.get(part), Mapping):
            raise ValueError(f"config.json has no {part} section; it is not an InternVL / Sa2VA config")
    llm, vis = config["llm_config"], config["vision_config"]
    arch = (llm.get("architectures") or [None])[0]
    if arch not in LLM_ARCHITECTURES:
        raise ValueError(
            f"config.json: llm_config.architectures={llm.get('architectures')} is not supported; "
            f"known: {sorted(LLM_ARCHITECTURES)}"
        )
    text: dict[str, Any] = {"model_type": LLM_ARCHITECTURES[arch]}
    for name in TEXT_FIELDS:
        if llm.get(name) is not None:
            text[name] = llm[name]
    text.setdefault("num_key_value_heads", text.get("num_attention_heads"))
    rope = {name: llm.get(name) for name in ("rope_theta", "rope_scaling", "rope_parameters")}
    text = with_rope_parameters({**text, **rope})
    if arch == "InternLM2ForCausalLM":
        text["attention_bias"] = bool(llm.get("bias", True))
    size = _side(config.get("force_image_size") or vis["image_size"])
    patch = _side(vis["patch_size"])
    vision = {
        "hidden_size": vis["hidden_size"],
        "num_hidden_layers": vis["num_hidden_layers"],
        "num_attention_heads": vis["num_attention_heads"],
        "intermediate_size": vis["intermediate_size"],
        "image_size": [size, size],
        "patch_size": [patch, patch],
        "norm_type": vis.get("norm_type", "rms_norm"),
        "use_qk_norm": bool(vis.get("qk_normalization", False)),
        "attention_bias": bool(vis.get("qkv_bias", False)),
        "layer_norm_eps": vis.get("layer_norm_eps", 1e-6),
        "hidden_act": vis.get("hidden_act", "gelu"),
    }
    template = config.get("template")
    return {
        "family": "internvl",
        "template": template.replace("-", "_") if isinstance(template, str) else None,
        "downsample_ratio": float(config.get("downsample_ratio", 0.5)),
        "tie_word_embeddings": bool(llm.get("tie_word_embeddings", False)),
        "vision": vision,
        "text": text,
        "llm_architecture": arch,
    }


def config_from_architecture(
    vision: Mapping[str, Any],
    text: Mapping[str, Any],
    *,
    downsample_ratio: float,
    template: str,
    tie_word_embeddings: bool,
    vocab_size: int,
    llm_architecture: str,
    max_tiles: int,
    dtype: str,
    extra_llm: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An official `Sa2VAChatConfig` dict (what the authors' code reads) for a vseg architecture."""
    size, patch = _side(vision.get("image_size", 448)), _side(vision.get("patch_size", 14))
    vision_config = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": vision["hidden_size"],
        "num_hidden_layers": vision["num_hidden_layers"],
        "num_attention_heads": vision["num_attention_heads"],
        "intermediate_size": vision["intermediate_size"],
        "image_size": size,
        "patch_size": patch,
        "num_channels": 3,
        "qkv_bias": bool(vision.get("attention_bias", False)),
        "qk_normalization": bool(vision.get("use_qk_norm", False)),
        "norm_type": vision.get("norm_type", "layer_norm"),
        "layer_norm_eps": vision.get("layer_norm_eps", 1e-6),
        "hidden_act": vision.get("hidden_act", "gelu"),
        "initializer_factor": vision.get("layer_scale_init_value", 0.1),
        "initializer_range": 0.02,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "drop_path_rate": 0.0,
        "use_flash_attn": False,
        "torch_dtype": dtype,
    }
    model_type = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "internlm2"}
    llm_config: dict[str, Any] = {"architectures": [llm_architecture], "model_type": model_type[llm_architecture]}
    for name in TEXT_FIELDS:
        if name in text:
            llm_config[name] = text[name]
    llm_config.update(rope_theta_and_scaling(text))
    if llm_architecture == "InternLM2ForCausalLM":
        llm_config["bias"] = bool(text.get("attention_bias", False))
        llm_config["auto_map"] = {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
        }
    llm_config.update(extra_llm or {})
    llm_config["vocab_size"] = vocab_size
    llm_config["tie_word_embeddings"] = tie_word_embeddings
    llm_config["torch_dtype"] = dtype
    return {
        "architectures": ["Sa2VAChatModel"],
        "model_type": "sa2va_chat",
        "auto_map": {
            "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfig",
            "AutoModel": "modeling_sa2va_chat.Sa2VAChatModel",
            "AutoModelForCausalLM": "modeling_sa2va_chat.Sa2VAChatModel",
        },
        "vision_config": vision_config,
        "llm_config": llm_config,
        "downsample_ratio": downsample_ratio,
        "template": template,
        "force_image_size": size,
        "select_layer": -1,
        "ps_version": "v2",
        "dynamic_image_size": max_tiles > 1,
        "use_thumbnail": max_tiles > 1,
        "min_dynamic_patch": 1,
        "max_dynamic_patch": max_tiles,
        "pad2square": False,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
    }


# ---- Qwen-VL releases: config.json <-> ModelConfig fields ------------------------------------------------------

#: `Sa2VAChatConfigQwen` subclasses the transformers Qwen-VL config: its config.json is that config's dict with
#: model_type `sa2va_chat`, this architecture, `template` and the remote-code auto_map.
QWEN_ARCHITECTURE = "Sa2VAChatModelQwen"
QWEN_AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_chat.Sa2VAChatConfigQwen",
    "AutoModel": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
    "AutoModelForCausalLM": "modeling_sa2va_qwen.Sa2VAChatModelQwen",
}
#: sub-config model_type prefix -> vseg family
QWEN_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl"}
_QWEN_TEXT_FIELDS = (*TEXT_FIELDS, "head_dim", "attention_bias", "rope_parameters")
# Bookkeeping keys of every transformers config: never architecture.
_CONFIG_NOISE = frozenset(
    {
        "_name_or_path",
        "architectures",
        "auto_map",
        "chunk_size_feed_forward",
        "dtype",
        "id2label",
        "initializer_range",
        "is_encoder_decoder",
        "label2id",
        "model_type",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
        "torch_dtype",
        "transformers_version",
    }
)


def qwen_family(config: Mapping[str, Any]) -> str | None:
    """`qwen2_5_vl` / `qwen3_vl` for a Qwen-VL (Sa2VA) config.json, None for anything else."""
    for part in ("vision_config", "text_config"):
        model_type = str((config.get(part) or {}).get("model_type") or "")
        for prefix, family in QWEN_MODEL_TYPES.items():
            if model_type.startswith(prefix):
                return family
    model_type = str(config.get("model_type") or "")
    return QWEN_MODEL_TYPES.get(model_type)


def _qwen_config_class(family: str) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    return {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[family]


def _plain_rope(rope: Mapping[str, Any]) -> dict[str, Any]:
    """`rope_parameters` without the legacy `type` alias that transformers keeps next to `rope_type`."""
    out = dict(rope)
    if "rope_type" in out:
        out.pop("type", None)
    return out


def qwen_architecture_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` architecture fields of a Qwen-VL Sa2VA `config.json` (nested or pre-5 flat text fields).

    The dict goes through the transformers config class first, so old spellings (`rope_theta` +
    `rope_scaling`, text fields at the top level) come out as the fields vseg's presets use.
    """
    family = qwen_family(config)
    if family is None:
        raise ValueError("config.json is not a Qwen2.5-VL / Qwen3-VL config (no qwen2_5_vl / qwen3_vl model_type)")
    cls = _qwen_config_class(family)
    raw = {k: v for k, v in config.items() if k not in _CONFIG_NOISE and k != "template"}
    hf = cls(**raw)
    text: dict[str, Any] = {}
    for name in _QWEN_TEXT_FIELDS:
        value = getattr(hf.text_config, name, None)
        if value is not None:
            text[name] = _plain_rope(value) if name == "rope_parameters" else value
    defaults = cls().vision_config.to_dict()
    vision = {
        k: v
        for k, v in hf.vision_config.to_dict().items()
        if k in defaults and k not in _CONFIG_NOISE and v is not None and k != "rope_parameters"
    }
    tied = config.get("tie_word_embeddings")
    if tied is None:
        tied = (config.get("text_config") or {}).get("tie_word_embeddings", hf.tie_word_embeddings)
    template = config.get("template")
    return {
        "family": family,
        "template": template.replace("-", "_") if isinstance(template, str) else None,
        "tie_word_embeddings": bool(tied),
        "vision": vision,
        "text": text,
    }


def qwen_config_from_mllm(mllm_config: Any, *, template: str, dtype: str) -> dict[str, Any]:
    """An official `Sa2VAChatConfigQwen` dict for a built transformers Qwen-VL config.

    The text config also carries `rope_theta` / `rope_scaling` (the spelling of transformers 4.5x, which the
    authors' code runs on) next to transformers 5's `rope_parameters`.
    """
    data = json.loads(mllm_config.to_json_string(use_diff=False))
    text = data["text_config"]
    rope = _plain_rope(text.get("rope_parameters") or {})
    if rope:
        text["rope_theta"] = rope.get("rope_theta")
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling.setdefault("rope_type", "default")
        text["rope_scaling"] = {"type": scaling["rope_type"], **scaling}
    tied = bool(data.get("tie_word_embeddings", False))
    text["tie_word_embeddings"] = tied
    for part in (data, text, data["vision_config"]):
        part.pop("_name_or_path", None)
        part["torch_dtype"] = dtype
        part["dtype"] = dtype
    data.update(
        architectures=[QWEN_ARCHITECTURE],
        model_type="sa2va_chat",
        auto_map=dict(QWEN_AUTO_MAP),
        template=template,
        tie_word_embeddings=tied,
    )
    return data
