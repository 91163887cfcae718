"""Checkpoint folders: load released Sa2VA / base InternVL / vseg-native folders natively, and write them back.

Loading (`model.path=DIR`, used by `build_sa2va`):

1. `read_folder` reads `config.json` and the safetensors headers (every shard named by the index must exist,
   and must hold the keys the index says). The kind comes from config.json: a released Sa2VA
   (`model_type: sa2va_chat`; InternVL family with `llm_config`, or Qwen2.5-VL / Qwen3-VL with `text_config`),
   a plain InternVL base MLLM (`internvl_chat`, no [SEG] / SAM-2 yet), or a
   vseg-native export (`vseg_format: native`).
2. **The architecture comes from the folder.** Its config.json is turned into `ModelConfig` fields and checked
   against the chosen `conf/model` preset: every field both define must agree (an error lists each mismatch
   with both values, so `model=sa2va_4b` with an 8B folder fails before anything is built; only
   `tie_word_embeddings`, how the head is stored, is taken from the folder with a warning). The folder's
   values fill what the preset leaves out; SAM-2's shape is not in the official config.json and comes from
   the preset (its weight shapes are still checked).
3. The tokenizer comes from the folder. A released checkpoint must already hold [SEG] and the other added
   tokens (found, never re-added: no embedding resize); a base MLLM gets them added on CPU, and its
   embedding / LM head grow by those rows at load time, filled with the mean of the old rows computed in
   row chunks (no full-matrix fp32 copy).
4. The network is built with its parameters on the meta device (buffers stay real), every key and shape of
   the folder is checked against it from the headers alone (missing / unexpected / mismatched keys are one
   error listing them), then tensors are read one at a time from their shard, converted, cast to
   `model.dtype` and placed on the target device: host peak is about the model plus one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vseg.artifacts import official
from vseg.artifacts.files import save_safetensors
from vseg.artifacts.loading import CheckpointError
from vseg.artifacts.official import InternVLLayout, Piece, QwenVLLayout
from vseg.config import ModelConfig
from vseg.model.random_init import alias_groups, parameters_on_meta, set_tensor

log = logging.getLogger(__name__)

NATIVE_FORMAT = "native"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if model_type in official.SA2VA_MODEL_TYPES or {"Sa2VAChatModel", official.QWEN_ARCHITECTURE} & set(architectures):
        return "sa2va"
    if model_type in official.INTERNVL_BASE_MODEL_TYPES or "InternVLChatModel" in architectures:
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


# ---- architecture: folder vs preset ----------------------------------------------------------------------------


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
        if folder.kind == "sa2va" and official.qwen_family(folder.config) is not None:
            return official.qwen_architecture_from_config(folder.config)
        return official.architecture_from_config(folder.config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{folder.path}/config.json: {err}") from None


# How a folder stores its head, not which model it is: the folder decides (Sa2VA's converter writes every
# Qwen-VL release untied, although the Qwen base models tie), with a warning instead of a mismatch error.
FOLDER_DECIDES = frozenset({"tie_word_embeddings"})


def merge_architecture(cfg: ModelConfig, folder: Folder, arch: dict[str, Any]) -> ModelConfig:
    """The preset with the folder's architecture; raises listing every field where the two disagree."""
    arch = {**arch, "text": official.with_rope_parameters(arch.get("text") or {})}
    cfg = dataclasses.replace(cfg, text=official.with_rope_parameters(cfg.text))
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


# ---- building on meta, loading tensors ---------------------------------------------------------------------------


def _grow_rows(old: torch.Tensor, rows: int) -> torch.Tensor:
    """`old` with extra rows, each the mean of the old rows (accumulated in fp32, 4096 rows at a time)."""
    total = torch.zeros(old.shape[1:], dtype=torch.float32, device=old.device)
    for chunk in old.split(4096):
        total += chunk.float().sum(dim=0)
    grown = torch.empty((rows, *old.shape[1:]), dtype=old.dtype, device=old.device)
    grown[: old.shape[0]] = old
    grown[old.shape[0] :] = (total / old.shape[0]).to(old.dtype)
    return grown


Converter = Callable[[str, torch.Tensor], list[Piece] | None]


@dataclass
class LoadReport:
    """What a load did: tensors read, dropped source prefixes (with counts), rows added to grown matrices."""

    loaded: int
    dropped: dict[str, int]
    grown: dict[str, tuple[int, int]]


def load_tensors(
    model: nn.Module,
    folder: Folder,
    convert: Converter,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    is_dropped: Callable[[str], bool] = lambda key: False,
    drop_prefix: Callable[[str], str] = lambda key: key,
    may_grow: frozenset[str] = frozenset(),
    may_miss: tuple[str, ...] = (),
) -> LoadReport:
    """Fills `model` (parameters on meta) from `folder`, tensor by tensor; checks everything first.

    Args:
        convert: source key + tensor -> native pieces (None: a key the layout does not know).
        is_dropped / drop_prefix: source keys that are deliberately not loaded, and how to group them in the log.
        may_grow: native keys whose source may have fewer rows (a base MLLM's embedding before [SEG]).
        may_miss: native key prefixes the folder need not provide (they were built with real weights).

    Raises:
        CheckpointError: listing missing, unexpected and shape-mismatched keys (nothing is loaded then).
    """
    targets = model.state_dict(keep_vars=True)
    aliases = alias_groups(model)
    covered: dict[str, set[int] | None] = {}  # canonical native key -> None (whole) or rows filled
    unexpected, mismatched, duplicated = [], [], []
    dropped: Counter[str] = Counter()
    for name, keys in folder.files.items():
        with safe_open(str(folder.path / name), framework="pt", device="cpu") as f:
            for key in keys:
                if is_dropped(key):
                    dropped[drop_prefix(key)] += 1
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                pieces = convert(key, torch.empty(shape, device="meta"))
                if pieces is None:
                    unexpected.append(key)
                    continue
                for piece in pieces:
                    if piece.key not in targets:
                        unexpected.append(key if piece.key == key else f"{key} (-> {piece.key})")
                        continue
                    want, got = tuple(targets[piece.key].shape), tuple(piece.tensor.shape)
                    canonical = aliases[piece.key][0]
                    if piece.row is not None:
                        if got != want[1:] or piece.row >= want[0]:
                            mismatched.append(f"{key}: row {piece.row} of shape {got} for {piece.key} {want}")
                            continue
                        rows = covered.setdefault(canonical, set())
                        if rows is None or piece.row in rows:
                            duplicated.append(key)
                        else:
                            rows.add(piece.row)
                        continue
                    grows = piece.key in may_grow and got[1:] == want[1:] and got[0] <= want[0]
                    if got != want and not grows:
                        mismatched.append(f"{key}: checkpoint {got}, model {piece.key} {want}")
                        continue
                    if canonical in covered and aliases[piece.key] == [piece.key]:
                        duplicated.append(key)
                    covered[canonical] = None
    missing = []
    for name in targets:
        canonical = aliases[name][0]
        if name != canonical or name.startswith(may_miss):
            continue
        rows = covered.get(canonical, "absent")
        if rows == "absent" or (isinstance(rows, set) and len(rows) != targets[name].shape[0]):
            missing.append(name)
    problems = []
    for label, items in (
        ("missing (the model has them, the folder does not)", missing),
        ("unexpected (the folder has them, the model does not)", unexpected),
        ("with mismatched shapes", mismatched),
        ("given more than once", duplicated),
    ):
        if items:
            shown = "\n      ".join(items[:20]) + (f"\n      ... and {len(items) - 20} more" if len(items) > 20 else "")
            problems.append(f"{len(items)} keys {label}:\n      {shown}")
    if problems:
        raise CheckpointError(
            f"{folder.path} does not fit the model built from its config:\n  - " + "\n  - ".join(problems)
        )
    for prefix, count in sorted(dropped.items()):
        log.info("%s: dropped %d tensors under %s (not used for single images)", folder.path.name, count, prefix)

    partial: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = defaultdict(int)
    grown: dict[str, tuple[int, int]] = {}
    assigned: set[str] = set()
    loaded = 0

    def assign(name: str, value: torch.Tensor) -> None:
        canonical = aliases[name][0]
        if canonical in assigned:
            current = targets[canonical]
            if not torch.equal(current, value):
                raise CheckpointError(f"{folder.path}: tied tensors {aliases[name]} differ in the checkpoint")
            return
        if isinstance(targets[canonical], nn.Parameter):
            value = nn.Parameter(value, requires_grad=False)
        for alias in aliases[name]:
            set_tensor(model, alias, value)
        targets.update({alias: value for alias in aliases[name]})
        assigned.add(canonical)

    for name, keys in folder.files.items():
        with safe_open(str(folder.path / name), framework="pt", device="cpu") as f:
            for key in keys:
                if is_dropped(key):
                    continue
                for piece in convert(key, f.get_tensor(key)) or []:
                    value = piece.tensor.to(device=device, dtype=dtype if piece.tensor.is_floating_point() else None)
                    want = tuple(targets[piece.key].shape)
                    if piece.row is not None:
                        buffer = partial.setdefault(piece.key, torch.empty(want, dtype=value.dtype, device=device))
                        buffer[piece.row] = value
                        filled[piece.key] += 1
                        if filled[piece.key] == want[0]:
                            assign(piece.key, partial.pop(piece.key))
                        continue
                    if tuple(value.shape) != want:
                        grown[piece.key] = (value.shape[0], want[0])
                        value = _grow_rows(value, want[0])
                    assign(piece.key, value.contiguous())
                loaded += 1
    leftovers = [n for n, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if leftovers:
        raise CheckpointError(f"{folder.path}: {len(leftovers)} tensors were never loaded, e.g. {leftovers[:5]}")
    return LoadReport(loaded, dict(dropped), grown)


# ---- the model.path entry point --------------------------------------------------------------------------------


def layout_for(
    folder: Folder, cfg: ModelConfig, arch: dict[str, Any], with_memory: bool = True
) -> tuple[Converter, Callable[[str], bool]]:
    """How keys of `folder` become native keys, and which of them are deliberately left out."""
    if folder.kind == "native":
        return (lambda key, tensor: [Piece(key, tensor)]), (lambda key: False)
    if arch.get("family") in official.QWEN_MODEL_TYPES.values():
        qwen = QwenVLLayout(with_grounding=folder.kind == "sa2va")
        qwen.with_memory = with_memory
        return qwen.to_native, qwen.is_dropped
    heads = int(cfg.text["num_attention_heads"])
    layout = InternVLLayout(
        arch["llm_architecture"],
        heads,
        int(cfg.text.get("num_key_value_heads") or heads),
        with_grounding=folder.kind == "sa2va",
    )
    layout.with_memory = with_memory
    return layout.to_native, layout.is_dropped


def _drop_prefix(key: str) -> str:
    for prefix in (*official.DROPPED_SAM2_PREFIXES, *official.UNUSED_SAM2_PREFIXES):
        if key.startswith(prefix):
            return prefix
    return key


def load_sa2va(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Any, ModelConfig]:
    """Builds the Sa2VA of `cfg.path` with its weights, frozen, in `cfg.dtype` on `device`.

    Returns:
        (model, tokenizer, the effective ModelConfig: the preset with the folder's architecture).
    """
    from vseg.model.build import build_grounding
    from vseg.model.families import get_family
    from vseg.model.sa2va import Sa2VA
    from vseg.model.tokenizer import SEG_TOKEN, ensure_special_tokens, load_tokenizer, token_id

    folder = read_folder(cfg.path)  # type: ignore[arg-type]
    arch = folder_architecture(folder)
    tokenizer = load_tokenizer(cfg.tokenizer_path or str(folder.path))
    added = ensure_special_tokens(tokenizer, get_family(arch.get("family") or cfg.family).added_tokens)
    base = folder.kind == "internvl_base"
    if added and not base:
        raise CheckpointError(
            f"the tokenizer of {cfg.tokenizer_path or folder.path} lacks {added}: a Sa2VA checkpoint carries them "
            "(a wrong tokenizer_path?)"
        )
    if base:
        # The embedding grows by the added rows at load time; the architecture must say so.
        arch["text"]["vocab_size"] = max(int(arch["text"].get("vocab_size", 0)), len(tokenizer))
        cfg = dataclasses.replace(cfg, text={k: v for k, v in cfg.text.items() if k != "vocab_size"})
    cfg = merge_architecture(cfg, folder, arch)
    family = get_family(cfg.family)
    with parameters_on_meta():
        mllm = family.build(cfg, tokenizer)
    with parameters_on_meta(enabled=not base):
        model = Sa2VA(mllm, family, build_grounding(cfg), token_id(tokenizer, SEG_TOKEN))
    memory_prefixes = (*official.DROPPED_SAM2_PREFIXES, official.MEMORY)
    has_memory = any(k.startswith(memory_prefixes) for keys in folder.files.values() for k in keys)
    if model.grounding.memory is not None and not base and not has_memory:
        # An export written before memory was kept: images work, runs cannot be tracked (Tracker says so).
        log.warning("%s has no SAM-2 memory tensors: it predicts images, not runs (video)", folder.path)
        model.grounding.memory = None
    convert, is_dropped = layout_for(folder, cfg, arch, with_memory=model.grounding.memory is not None)
    dtype = DTYPES[cfg.dtype]
    report = load_tensors(
        model,
        folder,
        convert,
        dtype=dtype,
        device=device,
        is_dropped=is_dropped,
        drop_prefix=_drop_prefix,
        may_grow=frozenset({official.LANGUAGE + "embed_tokens.weight", official.LM_HEAD + "weight"})
        if base
        else frozenset(),
        may_miss=(official.SAM, official.MEMORY, "text_hidden_fcs.") if base else (),
    )
    model.requires_grad_(False)
    model.to(dtype)
    for key, (old, new) in report.grown.items():
        log.info("%s: %d -> %d rows (added tokens %s, initialised to the mean row)", key, old, new, added)
    if base:
        log.warning(
            "%s is a base MLLM without grounding weights: SAM-2 and text_hidden_fcs start from random init",
            folder.path,
        )
    log.info("loaded %d tensors from %s (%s)", report.loaded, folder.path, folder.kind)
    return model, tokenizer, cfg


# ---- writing -------------------------------------------------------------------------------------------------------


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


def _full_architecture(model: nn.Module, cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """`cfg.vision` / `cfg.text` completed with the defaults the built transformers configs filled in."""
    config = model.base_mllm.config if hasattr(model, "base_mllm") else model.mllm.config
    text, vision = dict(cfg.text), dict(cfg.vision)
    for name in official.TEXT_FIELDS:
        if name not in text and getattr(config.text_config, name, None) is not None:
            text[name] = getattr(config.text_config, name)
    text = official.with_rope_parameters(text)
    if "rope_parameters" not in text and getattr(config.text_config, "rope_parameters", None):
        text["rope_parameters"] = dict(config.text_config.rope_parameters)
    for name in (
        "layer_norm_eps",
        "hidden_act",
        "norm_type",
        "use_qk_norm",
        "attention_bias",
        "layer_scale_init_value",
    ):
        if name not in vision and getattr(config.vision_config, name, None) is not None:
            vision[name] = getattr(config.vision_config, name)
    return vision, text


def official_layout(cfg: ModelConfig) -> tuple[InternVLLayout | QwenVLLayout, str | None]:
    """The official key layout (and, for the InternVL family, the LLM architecture name) of a ModelConfig."""
    if cfg.family in official.QWEN_MODEL_TYPES.values():
        return QwenVLLayout(), None
    if cfg.family != "internvl":
        raise ValueError(f"model.family={cfg.family!r} has no official Sa2VA layout")
    model_type = cfg.text.get("model_type", "qwen2")
    # Sa2VA's Llama-layout LLMs are InternLM2 (8B, 26B): the released names are InternLM2's.
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "InternLM2ForCausalLM"}.get(model_type)
    if arch is None:
        raise ValueError(f"model.text.model_type={model_type!r} has no official Sa2VA layout (qwen2 | llama)")
    heads = int(cfg.text["num_attention_heads"])
    return InternVLLayout(arch, heads, int(cfg.text.get("num_key_value_heads") or heads)), arch


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
    layout, arch = official_layout(cfg)
    torch_dtype = DTYPES[dtype]
    tensors = _tensors_in(model, torch_dtype)
    tied = bool(cfg.tie_word_embeddings)
    converted = dict(layout.to_official(tensors, tied=tied))
    if base is not None and base.kind == "sa2va":
        for name, keys in base.files.items():
            with safe_open(str(base.path / name), framework="pt", device="cpu") as f:
                for key in keys:
                    if layout.is_dropped(key):
                        value = f.get_tensor(key)
                        converted[key] = value.to(torch_dtype) if value.is_floating_point() else value
    write_safetensors(converted.items(), folder, max_shard_bytes)
    vocab = int(tensors[official.LANGUAGE + "embed_tokens.weight"].shape[0])
    if base is not None and base.kind == "sa2va":
        config = json.loads(json.dumps(base.config))
        if arch is None:  # Qwen-VL: nested text_config (or, saved by older transformers, top-level text fields)
            text = config["text_config"] if isinstance(config.get("text_config"), dict) else config
            text["vocab_size"] = vocab
            text["torch_dtype"] = dtype
        else:
            config["llm_config"].update(vocab_size=vocab, torch_dtype=dtype)
        config["torch_dtype"] = dtype
        for source in sorted(base.path.glob("*.py")):
            (folder / source.name).write_bytes(source.read_bytes())
    elif arch is None:
        mllm = model.base_mllm if hasattr(model, "base_mllm") else model.mllm
        config = official.qwen_config_from_mllm(mllm.config, template=cfg.template, dtype=dtype)
    else:
        vision, text = _full_architecture(model, cfg)
        config = official.config_from_architecture(
            vision,
            text,
            downsample_ratio=cfg.downsample_ratio,
            template=cfg.template,
            tie_word_embeddings=tied,
            vocab_size=vocab,
            llm_architecture=arch,
            max_tiles=cfg.max_tiles,
            dtype=dtype,
        )
    write_json(folder / "config.json", config)
    tokenizer.save_pretrained(str(folder))
    if arch is None:
        _write_qwen_processor_files(model, cfg, folder, base)


#: Qwen-VL releases ship their processor too (the authors' `predict_forward` takes it)
QWEN_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _write_qwen_processor_files(model: nn.Module, cfg: ModelConfig, folder: Path, base: Folder | None) -> None:
    """The base release's processor files, or (no base) the image processor config vseg uses."""
    copied = False
    if base is not None:
        for name in QWEN_PROCESSOR_FILES:
            if (base.path / name).is_file() and not (folder / name).exists():
                (folder / name).write_bytes((base.path / name).read_bytes())
                copied = copied or name == "preprocessor_config.json"
    if not copied:
        mllm = model.base_mllm if hasattr(model, "base_mllm") else model.mllm
        family = model.family
        family.image_processor(mllm.config, cfg).save_pretrained(str(folder))
