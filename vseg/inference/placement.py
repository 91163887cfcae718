"""Where the model runs: one device, or split over several GPUs with accelerate (`device_map`).

Model-parallel: `device_map=sequential` fills the GPUs in order up to `max_memory` each; `balanced` (and
`auto`, as in transformers) first evens the budget out over the GPUs. Blocks are never split: a decoder
layer, a vision layer, a SAM-2 Hiera block, the SAM-2 prompt encoder / mask decoder and `text_hidden_fcs` each
stay on one device (`no_split_classes`). accelerate's hooks move activations between blocks, and Sa2VA's own
code moves every tensor it indexes or combines to the device of the part that uses it (the [SEG] mask, the
image index, the SAM-2 features), which is what the users' split runs lacked ("indices should be either on
cpu or on the same device as the indexed tensor").

Memory-planner hook: `plan_device_map` is the one place that decides the split; a planner (issue 6) can
pass its own `max_memory` or replace the map before `dispatch`, and `PlacementError` carries the advice shown
when a model does not fit.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
import yaml
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

from vseg.config import ConfigError

log = logging.getLogger(__name__)

DEVICE_MAPS = ("auto", "balanced", "sequential")
# Leaf blocks that must stay whole: attention + MLP with their residuals, SAM-2 heads, the [SEG] projection.
_NO_SPLIT_SUFFIXES = ("DecoderLayer", "VisionLayer", "VisionBlock", "MultiScaleBlock", "EncoderLayer")
_NO_SPLIT_NAMES = (
    "Sam2MaskDecoder",
    "Sam2PromptEncoder",
    "Sam2VisionNeck",
    "Sequential",
    "InternVLMultiModalProjector",
)


class PlacementError(ConfigError):
    """The model cannot be placed as asked (e.g. it does not fit in `max_memory`); the message says what to do."""


def no_split_classes(model: nn.Module) -> list[str]:
    """Class names of the model's blocks that must not be split across devices."""
    names = {type(m).__name__ for m in model.modules()}
    return sorted(n for n in names if n.endswith(_NO_SPLIT_SUFFIXES) or n in _NO_SPLIT_NAMES)


def parse_max_memory(value: Any) -> dict[int | str, int | str] | None:
    """`{0: 12GB, 1: 12GB}` (Hydra dict or string) -> accelerate's max_memory (int GPU indices, cpu/disk)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"max_memory={value!r}: expected a mapping like {{0: 12GB, 1: 12GB}}")
    out: dict[int | str, int | str] = {}
    for key, size in dict(value).items():
        k = str(key).strip()
        if k.isdigit():
            out[int(k)] = str(size) if not isinstance(size, int) else size
        elif k.startswith("cuda:") and k[5:].isdigit():
            out[int(k[5:])] = str(size) if not isinstance(size, int) else size
        elif k in ("cpu", "disk", "mps"):
            out[k] = str(size) if not isinstance(size, int) else size
        else:
            raise ConfigError(f"max_memory key {key!r}: expected a GPU index (0, 1, ...), cpu or disk")
    return out


def plan_device_map(
    model: nn.Module, mode: str, max_memory: dict[int | str, int | str] | None, dtype: torch.dtype
) -> dict[str, int | str]:
    """The module -> device map for `mode` (auto | balanced | sequential) within `max_memory`."""
    if mode not in DEVICE_MAPS:
        raise ConfigError(f"device_map={mode!r}: expected one of {DEVICE_MAPS} (or null for one device)")
    no_split = no_split_classes(model)
    if mode in ("auto", "balanced"):
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    offloaded = sorted(k for k, v in device_map.items() if v in ("cpu", "disk"))
    gpus = [v for v in device_map.values() if v not in ("cpu", "disk")]
    if offloaded and gpus:
        raise PlacementError(
            f"the model does not fit in max_memory={max_memory}: {len(offloaded)} blocks would be offloaded to "
            f"CPU/disk (e.g. {offloaded[:3]}); raise max_memory, use more GPUs, or a smaller dtype"
        )
    log.info("device_map=%s: %s", mode, dict(Counter(str(v) for v in device_map.values())))
    return device_map


def dispatch(model: nn.Module, device_map: dict[str, int | str], offload_dir: str | None = None) -> nn.Module:
    """Places the (real or meta-built, materialised) model by `device_map` and adds accelerate's hooks."""
    devices = [v for v in device_map.values() if v not in ("cpu", "disk")]
    main = torch.device("cuda", devices[0]) if devices and isinstance(devices[0], int) else None
    return dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir)


def devices_of(model: nn.Module) -> dict[str, int]:
    """How many parameter tensors live on each device (a split check)."""
    return dict(Counter(str(p.device) for p in model.parameters()))


def resolve_device(name: str) -> torch.device:
    """`auto` -> the first CUDA GPU if any, else CPU; anything else as torch parses it (checked)."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA GPU is visible; use device=cpu or run on a GPU machine")
    return device
