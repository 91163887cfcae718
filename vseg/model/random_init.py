"""Sa2VA without weights: built on the meta device, then filled with random weights where it will run.

Loading a checkpoint (`vseg.artifacts.folders.load`) and `ckpt=random` (benchmarks at real sizes) both start from
a network whose parameters are on the meta device: nothing is allocated on the host, and every parameter
later gets its real tensor in place (tied names keep sharing one tensor).
"""

from __future__ import annotations

import contextlib
import zlib
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vseg.config import ModelConfig
from vseg.model.build import DTYPES, finish_build, new_sa2va


@contextlib.contextmanager
def parameters_on_meta(enabled: bool = True) -> Iterator[None]:
    """Modules created inside get their parameters on the meta device; buffers (rotary tables) stay real.

    Parameters are allocated uninitialised and moved at registration, so a 26B model costs no host memory
    and no random-init time; the loader then gives every parameter its real tensor.
    """
    if not enabled:
        yield
        return
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every state-dict name -> all names of the same tensor (tied embeddings share one parameter)."""
    by_id: dict[int, list[str]] = defaultdict(list)
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_id[id(tensor)].append(name)
    return {name: names for names in by_id.values() for name in names}


def set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Puts `value` in place of parameter or buffer `name` (a Parameter is kept as is: tied names share it)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = (
            value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
        )
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise KeyError(name)


# ------------------------------------------------------------------------------------------- random weights
def _fill(param: torch.Tensor, name: str, generator: torch.Generator) -> None:
    if param.ndim >= 2:
        param.normal_(0.0, 0.02, generator=generator)
    elif name.endswith("weight") or name.endswith("scale") or name.endswith("lambda1"):
        param.fill_(1.0)
    else:
        param.normal_(0.0, 0.02, generator=generator)


def build_meta(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """The architecture of `cfg` with its parameters on the meta device (buffers real), and its tokenizer."""
    with parameters_on_meta():
        model, tokenizer = new_sa2va(cfg)
        finish_build(model, tokenizer, cfg, None)
    return model, tokenizer


def materialize_random(model: nn.Module, device_map: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Allocates every meta parameter on its `device_map` device and fills it there (random weights).

    N(0, 0.02) for matrices and biases, 1 for norm scales; tied parameters stay one tensor. Nothing is
    created on the host, so an 8B model is ready in seconds on the GPUs that will run it.
    """
    aliases = alias_groups(model)
    done: set[str] = set()
    for name, _ in list(model.named_parameters(remove_duplicate=False)):
        canonical = aliases[name][0]
        if canonical in done:
            continue
        device = device_for(name, device_map)
        # Seeded per parameter name: the same weights whatever the placement (single GPU == device_map).
        gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(canonical.encode()))
        value = torch.empty(model.get_parameter(name).shape, dtype=dtype, device=device)
        _fill(value, name, gen)
        tensor = nn.Parameter(value, requires_grad=False)
        for alias in aliases[name]:
            set_tensor(model, alias, tensor)
        done.add(canonical)
    for name, buffer in list(model.named_buffers()):
        set_tensor(model, name, buffer.to(device_for(name, device_map)))
    return model


def build_random(cfg: ModelConfig, device_map: dict[str, Any], seed: int = 0) -> tuple[nn.Module, Any]:
    """`cfg`'s architecture with random weights created directly where `device_map` puts them (`ckpt=random`)."""
    model, tokenizer = build_meta(cfg)
    return materialize_random(model, device_map, DTYPES[cfg.dtype], seed), tokenizer


def device_for(name: str, device_map: dict[str, Any]) -> torch.device:
    best = None
    for prefix, device in device_map.items():
        covers = prefix == "" or name == prefix or name.startswith(prefix + ".")
        if covers and (best is None or len(prefix) > len(best[0])):
            best = (prefix, device)
    if best is None:
        raise KeyError(f"{name} is not covered by the device map")
    device = best[1]
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
