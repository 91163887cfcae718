"""Loading a checkpoint folder into vseg's model (`model.path=DIR`, used by `build_sa2va`).

1. `read_folder` (`.read`) reads config.json and the headers; the architecture comes from the folder and is
   checked against the preset (`merge_architecture`); SAM-2's shape is not in the official config.json and
   comes from the preset (its weight shapes are still checked).
2. The tokenizer comes from the folder. A released checkpoint must already hold [SEG] and the other added
   tokens (found, never re-added: no embedding resize); a base MLLM gets them added on CPU, and its
   embedding / LM head grow by those rows at load time, filled with the mean of the old rows computed in
   row chunks (no full-matrix fp32 copy).
3. The network is built with its parameters on the meta device (buffers stay real), every key and shape of
   the folder is checked against it from the headers alone (missing / unexpected / mismatched keys are one
   error listing them), then tensors are read one at a time from their shard, converted by the family's
   key layout, cast to `model.dtype` and placed on the target device: host peak is about the model plus
   one tensor.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from vseg.artifacts.folders.read import Folder, folder_architecture, merge_architecture, read_folder
from vseg.artifacts.loading import CheckpointError
from vseg.config import ModelConfig
from vseg.model.build import DTYPES, build_grounding
from vseg.model.families import get_family
from vseg.model.families.layout import (
    DROPPED_SAM2_PREFIXES,
    LANGUAGE,
    LM_HEAD,
    MEMORY,
    SAM,
    UNUSED_SAM2_PREFIXES,
    Piece,
)
from vseg.model.random_init import alias_groups, parameters_on_meta, set_tensor
from vseg.model.sa2va import Sa2VA
from vseg.model.tokenizer import SEG_TOKEN, ensure_special_tokens, load_tokenizer, token_id

log = logging.getLogger(__name__)


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


def layout_for(
    folder: Folder, cfg: ModelConfig, arch: dict[str, Any], with_memory: bool = True
) -> tuple[Converter, Callable[[str], bool]]:
    """How keys of `folder` become native keys (the family's release layout), and which are deliberately left out."""
    if folder.kind == "native":
        return (lambda key, tensor: [Piece(key, tensor)]), (lambda key: False)
    layout = get_family(cfg.family).layout(
        cfg, with_grounding=folder.kind == "sa2va", llm_architecture=arch.get("llm_architecture")
    )
    layout.with_memory = with_memory
    return layout.to_native, layout.is_dropped


def _drop_prefix(key: str) -> str:
    for prefix in (*DROPPED_SAM2_PREFIXES, *UNUSED_SAM2_PREFIXES):
        if key.startswith(prefix):
            return prefix
    return key


def load_sa2va(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[nn.Module, Any, ModelConfig]:
    """Builds the Sa2VA of `cfg.path` with its weights, frozen, in `cfg.dtype` on `device`.

    Returns:
        (model, tokenizer, the effective ModelConfig: the preset with the folder's architecture).
    """
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
    memory_prefixes = (*DROPPED_SAM2_PREFIXES, MEMORY)
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
        may_grow=frozenset({LANGUAGE + "embed_tokens.weight", LM_HEAD + "weight"}) if base else frozenset(),
        may_miss=(SAM, MEMORY, "text_hidden_fcs.") if base else (),
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
