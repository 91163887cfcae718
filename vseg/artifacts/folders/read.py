"""Reading a checkpoint folder: what kind it is, its shards' headers, its architecture against the preset.

Nothing here reads a tensor: `read_folder` opens config.json and the safetensors headers only (every
shard named by the index must exist and hold the keys the index says). The architecture comes from the
folder: `folder_architecture` turns its config.json into `ModelConfig` fields (the family converts an
official config), and `merge_architecture` checks them against the chosen `conf/model` preset: every
field both define must agree (an error lists each mismatch with both values, so `model=sa2va_4b` with an
8B folder fails before anything is built; only `tie_word_embeddings`, how the head is stored, is taken
from the folder with a warning). The folder's values fill what the preset leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vseg.artifacts.loading import CheckpointError
from vseg.config import ModelConfig
from vseg.model.families import (
    BASE_ARCHITECTURES,
    BASE_MODEL_TYPES,
    RELEASE_ARCHITECTURES,
    SA2VA_MODEL_TYPES,
    release_family,
)
from vseg.model.families.configs import with_rope_parameters

log = logging.getLogger(__name__)

NATIVE_FORMAT = "native"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class Folder:
    """A checkpoint folder as found on disk (nothing but headers read)."""

    path: Path
    config: dict[str, Any]
    kind: str  # "sa2va" | "internvl_base" | "native"
    files: dict[str, list[str]]  # shard file name -> tensor keys in it


def folder_kind(config: dict[str, Any], where: Path) -> str:
    """`sa2va`, `internvl_base` or `native`, from a parsed config.json; raises for anything else."""
    if config.get("vseg_format") == NATIVE_FORMAT:
        return "native"
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type in SA2VA_MODEL_TYPES or RELEASE_ARCHITECTURES & set(architectures):
        return "sa2va"
    if model_type in BASE_MODEL_TYPES or set(BASE_ARCHITECTURES) & set(architectures):
        return "internvl_base"
    raise CheckpointError(
        f"{where}/config.json: model_type={model_type!r}, architectures={architectures} is not a checkpoint vseg "
        "can load (expected a released Sa2VA folder (sa2va_chat: InternVL, Qwen2.5-VL or Qwen3-VL family), a plain "
        "InternVL base (internvl_chat) or a `vseg export format=native` folder)"
    )


def read_folder(path: str | Path) -> Folder:
    """Reads config.json and the safetensors headers of a local folder; every problem names the file."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise CheckpointError(f"model.path={path}: not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder}: no config.json; model.path must be a checkpoint folder with its config")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from None
    kind = folder_kind(config, folder)
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: no weight_map")
        listed: dict[str, list[str]] = defaultdict(list)
        for key, name in weight_map.items():
            listed[name].append(key)
    elif (folder / SINGLE_FILE).is_file():
        listed = {SINGLE_FILE: []}
    else:
        raise CheckpointError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE}; no weights to load")
    files: dict[str, list[str]] = {}
    for name, keys in listed.items():
        if Path(name).name != name or not name.endswith(".safetensors"):
            raise CheckpointError(f"{index_file}: shard name {name!r} is not a .safetensors file in the folder")
        shard = folder / name
        if not shard.is_file():
            raise CheckpointError(f"{folder}: shard {name} is missing ({len(keys)} tensors listed in {INDEX_FILE})")
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            present = list(f.keys())
        absent = sorted(set(keys) - set(present))
        if absent:
            raise CheckpointError(f"{shard}: lacks {len(absent)} tensors its index lists, e.g. {absent[:5]}")
        files[name] = present if not keys else list(keys)
    return Folder(folder, config, kind, files)


def _normalise(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    return value


def folder_architecture(folder: Folder) -> dict[str, Any]:
    """ModelConfig architecture fields the folder defines (plus `llm_architecture` for official folders)."""
    if folder.kind == "native":
        model = folder.config.get("model")
        if not isinstance(model, dict):
            raise CheckpointError(f"{folder.path}/config.json: vseg native config without a `model` section")
        fields = ("family", "template", "downsample_ratio", "projector_hidden_act", "tie_word_embeddings")
        arch = {k: model[k] for k in fields if k in model}
        arch.update({k: dict(model.get(k) or {}) for k in ("vision", "text", "sam2")})
        return arch
    try:
        return release_family(folder.config).architecture_from_config(folder.config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder.path}/config.json: {err}") from None


# How a folder stores its head, not which model it is: the folder decides (Sa2VA's converter writes every
# Qwen-VL release untied, although the Qwen base models tie), with a warning instead of a mismatch error.
FOLDER_DECIDES = frozenset({"tie_word_embeddings"})


def merge_architecture(cfg: ModelConfig, folder: Folder, arch: dict[str, Any]) -> ModelConfig:
    """The preset with the folder's architecture; raises listing every field where the two disagree."""
    arch = {**arch, "text": with_rope_parameters(arch.get("text") or {})}
    cfg = dataclasses.replace(cfg, text=with_rope_parameters(cfg.text))
    problems = []
    for name, value in arch.items():
        if name == "llm_architecture" or value is None:
            continue
        mine = getattr(cfg, name)
        if isinstance(value, dict):
            for key, v in value.items():
                if key in mine and _normalise(mine[key]) != _normalise(v):
                    if key in FOLDER_DECIDES:
                        log.warning(
                            "model.%s.%s: preset %r, checkpoint %r: the checkpoint's value is used",
                            name,
                            key,
                            mine[key],
                            v,
                        )
                        continue
                    problems.append(f"model.{name}.{key}: preset {mine[key]!r}, checkpoint {v!r}")
        elif _normalise(mine) != _normalise(value):
            if name in FOLDER_DECIDES:
                log.warning("model.%s: preset %r, checkpoint %r: the checkpoint's value is used", name, mine, value)
                continue
            problems.append(f"model.{name}: preset {mine!r}, checkpoint {value!r}")
    if problems:
        raise CheckpointError(
            f"model.path={folder.path} does not match model={cfg.name} (wrong family or size?):\n  - "
            + "\n  - ".join(problems)
            + "\nchoose the conf/model preset of this checkpoint, or override those fields"
        )
    updates: dict[str, Any] = {}
    for name, value in arch.items():
        if name == "llm_architecture" or value is None:
            continue
        updates[name] = {**getattr(cfg, name), **value} if isinstance(value, dict) else value
    return dataclasses.replace(cfg, **updates)
