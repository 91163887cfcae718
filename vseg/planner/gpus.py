"""The GPUs the planner plans for: what is visible (NVML, nvidia-smi, else torch) and sizes like `24GB`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

import torch

from vseg.config import ConfigError
from vseg.planner.memory import GB


def parse_memory(text: str | int | float, key: str = "gpu_memory") -> float:
    """'24GB', '24G', '24GiB', '24000MB', '0.5TB' or a bare number of GB -> bytes (GB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"{key}={text!r}: expected a size like 24GB, 80G or 40960MB")
    unit = {"": GB, "K": 1024, "M": 1024**2, "G": GB, "T": 1024**4}[match.group(2).upper()]
    if match.group(2) == "" and match.group(3):
        unit = 1  # "123B": bytes
    return float(match.group(1)) * unit


@dataclass
class GpuInfo:
    """One visible GPU: index as this process sees it, name, total and free bytes."""

    index: int
    name: str
    total: float
    free: float


def _visible(indices: list[str]) -> list[int] | None:
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    chosen = [x.strip() for x in raw.split(",") if x.strip()]
    out = []
    for item in chosen:
        if item.lstrip("-").isdigit() and int(item) >= 0:
            out.append(int(item))
        elif item in indices:  # UUIDs
            out.append(indices.index(item))
        else:
            break  # CUDA stops at the first invalid entry
    return out


def gpu_inventory() -> list[GpuInfo]:
    """Name, total and free memory of every visible GPU, without creating a CUDA context.

    Reads NVML (pynvml) or `nvidia-smi`; falls back to torch (which creates a context per device).
    Empty when there is no NVIDIA GPU.
    """
    rows: list[tuple[str, str, float, float]] = []  # uuid, name, total, free
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            rows.append(
                (uuid if isinstance(uuid, str) else uuid.decode(), str(name), float(mem.total), float(mem.free))
            )
    except Exception:  # noqa: BLE001 - no NVML: try nvidia-smi
        rows = []
    if not rows and shutil.which("nvidia-smi"):
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=uuid,name,memory.total,memory.free", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            for line in text.strip().splitlines():
                uuid, name, total, free = (x.strip() for x in line.split(","))
                rows.append((uuid, name, float(total) * 1024**2, float(free) * 1024**2))
        except (OSError, subprocess.SubprocessError, ValueError):
            rows = []
    if rows:
        visible = _visible([r[0] for r in rows])
        order = visible if visible is not None else list(range(len(rows)))
        return [GpuInfo(i, rows[j][1], rows[j][2], rows[j][3]) for i, j in enumerate(order) if j < len(rows)]
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, torch.cuda.get_device_name(i), float(total), float(free)))
    return out
