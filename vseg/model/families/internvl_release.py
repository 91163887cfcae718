"""The InternVL family's released layout: official Sa2VA keys <-> vseg's native keys, and the release's
`config.json` <-> `ModelConfig` fields.

Keys: `vision_model.*` (InternViT), `mlp1.{0,1,3}`, `language_model.*` in Qwen2 / Llama / InternLM2 names, SAM-2
as in every family (`InternVLLayout`); InternViT's fused `attn.qkv` splits in thirds, InternLM2's
`attention.wqkv` per GQA group. Config: `Sa2VAChatConfig` (`vision_config` InternViT fields, `llm_config` with
its architecture, `downsample_ratio`, `template`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from transformers import InternVLConfig

from vseg.config import ModelConfig
from vseg.model.families.configs import TEXT_FIELDS, rope_theta_and_scaling, with_rope_parameters
from vseg.model.families.layout import LANGUAGE, LM_HEAD, PROJECTOR, SAM2_RULES, VISION, Piece, ReleaseLayout, Rule

#: LLM architectures of the release (`llm_config.architectures[0]`) -> transformers model_type vseg builds
LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama", "InternLM2ForCausalLM": "llama"}
#: the LLM a vseg model of this family writes as (`model.text.model_type` -> `llm_config.architectures[0]`):
#: Sa2VA's Llama-layout LLMs are InternLM2 (8B, 26B), so the released names are InternLM2's
RELEASE_LLM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "InternLM2ForCausalLM"}
#: a plain InternVL base MLLM without [SEG], SAM-2 and text_hidden_fcs
INTERNVL_BASE_MODEL_TYPES = ("internvl_chat",)
INTERNVL_BASE_ARCHITECTURES = ("InternVLChatModel",)

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
# Special (shape-changing) keys, handled in code.
_VISION_QKV = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_NATIVE_VISION_Q = re.compile(re.escape(VISION) + r"encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
_WQKV = re.compile(r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.(weight|bias)")
_NATIVE_LLM_QKV = re.compile(re.escape(LANGUAGE) + r"layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")


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


class InternVLLayout(ReleaseLayout):
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
        rules = _VISION_RULES + llm + (SAM2_RULES if with_grounding else [])
        if not with_grounding:
            rules = [(o, n) for o, n in rules if not o.startswith("text_hidden_fcs")]
        self.rules = [Rule(o, n) for o, n in rules]

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

# ---- config.json <-> ModelConfig fields ----------------------------------------------------------------------


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


def full_architecture(mllm_config: InternVLConfig, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """`cfg.vision` / `cfg.text` completed with the defaults the built transformers configs filled in."""
    text, vision = dict(cfg.text), dict(cfg.vision)
    for name in TEXT_FIELDS:
        if name not in text and getattr(mllm_config.text_config, name, None) is not None:
            text[name] = getattr(mllm_config.text_config, name)
    text = with_rope_parameters(text)
    if "rope_parameters" not in text and getattr(mllm_config.text_config, "rope_parameters", None):
        text["rope_parameters"] = dict(mllm_config.text_config.rope_parameters)
    for name in (
        "layer_norm_eps",
        "hidden_act",
        "norm_type",
        "use_qk_norm",
        "attention_bias",
        "layer_scale_init_value",
    ):
        if name not in vision and getattr(mllm_config.vision_config, name, None) is not None:
            vision[name] = getattr(mllm_config.vision_config, name)
    return vision, text


def release_llm_architecture(cfg: ModelConfig) -> str:
    """`llm_config.architectures[0]` a model of `cfg` is written as."""
    model_type = cfg.text.get("model_type", "qwen2")
    arch = RELEASE_LLM_ARCHITECTURES.get(model_type)
    if arch is None:
        raise ValueError(f"model.text.model_type={model_type!r} has no official Sa2VA layout (qwen2 | llama)")
    return arch
