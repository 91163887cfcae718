"""config.json helpers every family shares: the LLM's architecture fields and the two spellings of RoPE."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
        rope = plain_rope(params)
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


def plain_rope(rope: Mapping[str, Any]) -> dict[str, Any]:
    """`rope_parameters` without the legacy `type` alias that transformers keeps next to `rope_type`."""
    out = dict(rope)
    if "rope_type" in out:
        out.pop("type", None)
    return out


# Bookkeeping keys of every transformers config: never architecture.
CONFIG_NOISE = frozenset(
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

#: top-level model_type of a released Sa2VA config.json (every family: the authors' `Sa2VAChatConfig*`)
SA2VA_MODEL_TYPES = ("sa2va_chat",)
