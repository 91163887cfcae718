"""Writing checkpoint folders: vseg's native layout, or the released (official) layout the authors' code loads.

Tensors go into safetensors shards of a bounded size (with an index when there are several); a model that
still carries PEFT adapters is refused (merge them first). The official layout's key names and config.json
come from the model family; with the released folder the run started from, its config.json, its unused
SAM-2 tensors and the authors' `*.py` files are carried over so the folder loads as the release does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vseg.artifacts.files import save_safetensors
from vseg.artifacts.folders.read import INDEX_FILE, NATIVE_FORMAT, SINGLE_FILE, Folder
from vseg.config import ModelConfig
from vseg.model.build import DTYPES
from vseg.model.families import MLLMFamily, get_family
from vseg.model.families.layout import LANGUAGE
from vseg.model.random_init import alias_groups


def write_safetensors(
    items: Iterable[tuple[str, torch.Tensor]],
    folder: Path,
    max_shard_bytes: int,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Writes tensors into shards of at most `max_shard_bytes` (+ an index when there are several).

    Returns:
        key -> shard file name.
    """
    shards: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    seen: set[str] = set()
    names: list[str] = []

    def flush() -> None:
        name = f"part-{len(names):05d}.safetensors.tmp"
        save_safetensors(current, folder / name, metadata={"format": "pt", **(metadata or {})})
        names.append(name)
        shards.append({k: torch.empty(0) for k in current})

    for key, tensor in items:
        if key in seen:
            raise ValueError(f"tensor {key!r} written twice")
        seen.add(key)
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.untyped_storage().nbytes() != nbytes or any(
            t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in current.values()
        ):
            tensor = tensor.clone()
        if current and size + nbytes > max_shard_bytes:
            flush()
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    weight_map: dict[str, str] = {}
    if len(names) == 1:
        os.replace(folder / names[0], folder / SINGLE_FILE)
        return dict.fromkeys(shards[0], SINGLE_FILE)
    for i, (tmp, keys) in enumerate(zip(names, shards, strict=True), start=1):
        final = f"model-{i:05d}-of-{len(names):05d}.safetensors"
        os.replace(folder / tmp, folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def native_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent tensors of an unwrapped Sa2VA, each tied group under its first name only."""
    aliases = alias_groups(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if aliases[name][0] == name:
            out[name] = tensor
    return out


def model_config_dict(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The ModelConfig stored in a native folder (no paths: the folder itself is the path)."""
    data = dataclasses.asdict(cfg)
    data.update(path=None, tokenizer_path=None, dtype=dtype)
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _tensors_in(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in native_state_dict(_unwrapped(model)).items()}


def _unwrapped(model: nn.Module) -> nn.Module:
    """`model` itself; refuses a model that still carries PEFT adapters (merge them first)."""
    if any("lora_" in n or "trainable_tokens_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model still holds PEFT adapters; merge them (merge_and_unload) before writing weights")
    return model


def write_native_folder(
    model: nn.Module, cfg: ModelConfig, tokenizer: Any, folder: Path, dtype: str, max_shard_bytes: int
) -> None:
    """vseg's own layout: the unwrapped Sa2VA state dict, config.json with the ModelConfig, tokenizer files."""
    tensors = _tensors_in(model, DTYPES[dtype])
    write_safetensors(tensors.items(), folder, max_shard_bytes, metadata={"vseg_format": NATIVE_FORMAT})
    write_json(folder / "config.json", {"vseg_format": NATIVE_FORMAT, "model": model_config_dict(cfg, dtype)})
    tokenizer.save_pretrained(str(folder))


def write_official_folder(
    model: nn.Module,
    cfg: ModelConfig,
    tokenizer: Any,
    folder: Path,
    dtype: str,
    max_shard_bytes: int,
    base: Folder | None = None,
) -> None:
    """The released layout: official key names, `Sa2VAChatConfig` (Qwen-VL: `Sa2VAChatConfigQwen`) config.json,
    tokenizer files (Qwen-VL: and the image processor config).

    With `base` (the released folder the run started from), its config.json is kept (vocabulary and dtype
    updated), the SAM-2 tensors vseg does not use (SAM 2.1 parts; memory, for a model without it) are copied over unchanged, and the authors'
    `*.py` files are copied too, so the folder loads with their code exactly as the release does. Without
    it, the folder lacks those memory tensors (the authors' `from_pretrained` initialises them) and their
    `*.py` files must be added by hand to use it with `trust_remote_code`.
    """
    family = get_family(cfg.family)
    layout = family.layout(cfg)
    torch_dtype = DTYPES[dtype]
    tensors = _tensors_in(model, torch_dtype)
    converted = dict(layout.to_official(tensors, tied=bool(cfg.tie_word_embeddings)))
    if base is not None and base.kind == "sa2va":
        for name, keys in base.files.items():
            with safe_open(str(base.path / name), framework="pt", device="cpu") as f:
                for key in keys:
                    if layout.is_dropped(key):
                        value = f.get_tensor(key)
                        converted[key] = value.to(torch_dtype) if value.is_floating_point() else value
    write_safetensors(converted.items(), folder, max_shard_bytes)
    vocab = int(tensors[LANGUAGE + "embed_tokens.weight"].shape[0])
    mllm = model.base_mllm if hasattr(model, "base_mllm") else model.mllm
    if base is not None and base.kind == "sa2va":
        config = family.release_config(base.config, vocab_size=vocab, dtype=dtype)
        for source in sorted(base.path.glob("*.py")):
            (folder / source.name).write_bytes(source.read_bytes())
    else:
        config = family.official_config(mllm.config, cfg, vocab_size=vocab, dtype=dtype)
    write_json(folder / "config.json", config)
    tokenizer.save_pretrained(str(folder))
    if family.processor_files:
        _write_processor_files(family, mllm.config, cfg, folder, base)


def _write_processor_files(
    family: MLLMFamily, mllm_config: Any, cfg: ModelConfig, folder: Path, base: Folder | None
) -> None:
    """The base release's processor files, or (no base) the image processor config vseg uses."""
    copied = False
    if base is not None:
        for name in family.processor_files:
            if (base.path / name).is_file() and not (folder / name).exists():
                (folder / name).write_bytes((base.path / name).read_bytes())
                copied = copied or name == "preprocessor_config.json"
    if not copied:
        family.image_processor(mllm_config, cfg).save_pretrained(str(folder))
