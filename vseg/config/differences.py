"""What differs between a trained model's config and the one a later command gives (predict, export, resume).

Runtime fields (dtype, attention kernel, ...) may change; any other difference means another model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vseg.config.schema import ModelConfig

#: ModelConfig fields that change how the same weights run, not which weights exist: a trained model takes
#: another value of these (predict.py model.attn_implementation=eager); any other difference is another model.
MODEL_RUNTIME_FIELDS = (
    "dtype",
    "attn_implementation",
    "gradient_checkpointing",
    "init_device",
    "sam_feature_cache",
    "prompt_style",
    "max_tiles",
    "image_factor",
    "min_pixels",
    "max_pixels",
)
#: LoraConfig fields that decide which weights train and their shapes (alpha and dropout do not)
LORA_SHAPE_FIELDS = (
    "enabled",
    "r",
    "target_modules",
    "train_projector",
    "train_mask_decoder",
    "train_text_hidden_fcs",
    "train_new_token_rows",
)


def differences(old: Any, new: Any, key: str, only_new_keys: bool = False) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf that differs; `only_new_keys`: keys absent from `new`
    are not compared (a partial override)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = list(new) if only_new_keys else sorted(set(old) | set(new), key=str)
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{key}.{k}", only_new_keys)]
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        old, new = list(old), list(new)
    return [] if old == new else [(key, old, new)]


def model_differences(
    own: ModelConfig, given: dict[str, Any], only_given: bool = True
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """(contradictions, runtime changes) between a trained model's config and model options `given`.

    `name` is a label and never compared; an unset `path` / `tokenizer_path` (a preset's null) says nothing.
    """
    mine = dataclasses.asdict(own)
    contradictions, runtime = [], []
    for field_name in given if only_given else mine:
        if field_name == "name" or field_name not in mine:
            continue
        if field_name in ("path", "tokenizer_path") and given.get(field_name) is None:
            continue
        found = differences(mine[field_name], given.get(field_name), f"model.{field_name}", only_given)
        (runtime if field_name in MODEL_RUNTIME_FIELDS else contradictions).extend(found)
    return contradictions, runtime


def describe_differences(found: list[tuple[str, Any, Any]], old: str, new: str, limit: int = 6) -> str:
    """`model.family: 'qwen3_vl' (run) vs 'internvl' (this command), ...`"""
    text = ", ".join(f"{k}: {a!r} ({old}) vs {b!r} ({new})" for k, a, b in found[:limit])
    return text + (f" and {len(found) - limit} more" if len(found) > limit else "")
