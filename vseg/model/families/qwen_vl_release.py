"""The Qwen-VL families' released layout (Sa2VA v2 on Qwen2.5-VL / Qwen3-VL): keys and config.json.

The authors' `Sa2VAChatModelQwen` keeps transformers' own `Qwen*VLForConditionalGeneration` as `model`, so
`model.model.visual.*`, `model.model.language_model.*` and `model.lm_head.*` map onto vseg's MLLM by prefix
(`QwenVLLayout`; the pre-4.52 `model.visual.*` / `model.model.*` names are read too); SAM-2 and
`text_hidden_fcs` as in every family. Its config.json is the transformers Qwen-VL config with model_type
`sa2va_chat` and a `template` (`qwen_architecture_from_config`, `qwen_config_from_mllm`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

from vseg.model.families.configs import CONFIG_NOISE, TEXT_FIELDS, plain_rope
from vseg.model.families.layout import LANGUAGE, LM_HEAD, SAM2_RULES, ReleaseLayout, Rule

#: Qwen-VL releases ship their processor too (the authors' `predict_forward` takes it)
QWEN_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


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


class QwenVLLayout(ReleaseLayout):
    """Key mapping of the Qwen2.5-VL / Qwen3-VL releases: `model.*` (the transformers MLLM, renamed by prefix
    only), `grounding_encoder.sam2_model.*` and `text_hidden_fcs.*` as in the InternVL releases."""

    tied_head_key = "model.lm_head.weight"

    def __init__(self, with_grounding: bool = True):
        self.with_grounding = with_grounding
        rules = _QWEN_RULES + (SAM2_RULES if with_grounding else [])
        self.rules = [Rule(o, n) for o, n in rules]


# ---- config.json <-> ModelConfig fields ----------------------------------------------------------------------


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
    return {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}[family]


def qwen_architecture_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The `ModelConfig` architecture fields of a Qwen-VL Sa2VA `config.json` (nested or pre-5 flat text fields).

    The dict goes through the transformers config class first, so old spellings (`rope_theta` +
    `rope_scaling`, text fields at the top level) come out as the fields vseg's presets use.
    """
    family = qwen_family(config)
    if family is None:
        raise ValueError("config.json is not a Qwen2.5-VL / Qwen3-VL config (no qwen2_5_vl / qwen3_vl model_type)")
    cls = _qwen_config_class(family)
    raw = {k: v for k, v in config.items() if k not in CONFIG_NOISE and k != "template"}
    hf = cls(**raw)
    text: dict[str, Any] = {}
    for name in _QWEN_TEXT_FIELDS:
        value = getattr(hf.text_config, name, None)
        if value is not None:
            text[name] = plain_rope(value) if name == "rope_parameters" else value
    defaults = cls().vision_config.to_dict()
    vision = {
        k: v
        for k, v in hf.vision_config.to_dict().items()
        if k in defaults and k not in CONFIG_NOISE and v is not None and k != "rope_parameters"
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
    rope = plain_rope(text.get("rope_parameters") or {})
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
