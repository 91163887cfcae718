"""MLLM families: everything that differs between InternVL and the Qwen-VL models, one module per family.

A family builds its transformers model from `ModelConfig`, turns an image into that model's inputs (and says
how many placeholder tokens the prompt needs), batches those inputs, runs the decoder to the last hidden
state, and knows its released checkpoints: their key layout and config.json, both ways (pure functions on
key names, tensors and config dicts; the files themselves are `vseg.artifacts.folders`' work). `Sa2VA`,
the data pipeline, the trainer and the artifacts layer only talk to this interface (`MLLMFamily`).

- `internvl`  InternVL2.5 / InternVL3 (Sa2VA 1B-26B, v2 InternVL3); `internvl_release`: its released keys
              and config.json
- `qwen_vl`   Qwen2.5-VL and Qwen3-VL (Sa2VA v2); `qwen_vl_release`: their released keys and config.json
- `layout`    the release layout every family shares (SAM-2, `text_hidden_fcs`) and the key-mapping machinery
- `configs`   config.json helpers every family shares (LLM fields, RoPE spellings)
- `base`      the `MLLMFamily` protocol and shared helpers

A new family is one more module here (two with its release layout), registered in `FAMILIES`, plus its `conf/model/*.yaml` presets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vseg.model.families.base import MLLMFamily, embedding_device, vocab_size
from vseg.model.families.configs import SA2VA_MODEL_TYPES
from vseg.model.families.internvl import InternVLFamily
from vseg.model.families.internvl_release import INTERNVL_BASE_ARCHITECTURES, INTERNVL_BASE_MODEL_TYPES
from vseg.model.families.qwen_vl import Qwen3VLFamily, Qwen25VLFamily, QwenVLFamily, smart_resize

FAMILIES: dict[str, MLLMFamily] = {
    "internvl": InternVLFamily(),
    "qwen2_5_vl": Qwen25VLFamily(),
    "qwen3_vl": Qwen3VLFamily(),
}
#: `architectures[0]` of every family's released Sa2VA config.json
RELEASE_ARCHITECTURES = frozenset(f.release_architecture for f in FAMILIES.values())
#: config.json model_type / architectures of a base MLLM vseg can turn into a Sa2VA (no [SEG], no SAM-2 yet)
BASE_MODEL_TYPES = INTERNVL_BASE_MODEL_TYPES
BASE_ARCHITECTURES = INTERNVL_BASE_ARCHITECTURES


def get_family(name: str) -> MLLMFamily:
    """The family called `name`, or an error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model.family {name!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[name]


def release_family(config: Mapping[str, Any]) -> MLLMFamily:
    """The family of a released (or base MLLM) config.json; InternVL when none recognises it (its reader then
    says what the file lacks)."""
    return next((f for f in FAMILIES.values() if f.reads_config(config)), FAMILIES["internvl"])


__all__ = [
    "BASE_ARCHITECTURES",
    "BASE_MODEL_TYPES",
    "FAMILIES",
    "RELEASE_ARCHITECTURES",
    "SA2VA_MODEL_TYPES",
    "InternVLFamily",
    "MLLMFamily",
    "Qwen25VLFamily",
    "Qwen3VLFamily",
    "QwenVLFamily",
    "embedding_device",
    "get_family",
    "release_family",
    "smart_resize",
    "vocab_size",
]
