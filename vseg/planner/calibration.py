"""Measured training peaks vs the planner's estimates: the table, its readers and the comparison.

Rows live in `vseg/planner/calibration.json` and in the training benchmark's result files
(`bench/results/train_*.json`, written by bench/train.py on GPU machines). Both are read with the same
tolerant key names, so a benchmark row needs no conversion. `compare(row)` rebuilds the row's setting on the
meta device and returns the estimate next to the measurement.

The check (`CHECKED`) is on peak *allocated* memory. Peak *reserved* is compared and shown, not held to the
tolerance: the caching allocator keeps freed blocks (set-up leftovers, ZeRO-3 gather buffers) and gives
them back and retries before it raises an out-of-memory error, so reserved grows into whatever room there
is. Measured: Sa2VA-26B under ZeRO-3 ran under a 23 GiB cap at 19.8 GiB allocated while reserved stood at
the cap (23.0); Sa2VA-4B at micro-batch 8 reserved 23.3 GiB on one GPU and 18.6 under DDP for the same
15.4 allocated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vseg.planner.facts import model_facts, sequence_facts
from vseg.planner.memory import GB, Setting, estimate
from vseg.planner.plan import load_for_planning

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("allocated",)  # which peaks the tolerance applies to (see the module docstring)
TABLE = Path(__file__).resolve().parent / "calibration.json"
BENCH_GLOB = "bench/results/train_*.json"
ALIASES = {
    "micro_batch": ("micro_batch", "batch_size", "micro_batch_size"),
    "accumulate": ("accumulate", "accumulation", "accumulate_grad_batches"),
    "grad_ckpt": ("grad_ckpt", "gradient_checkpointing"),
    "seq_len": ("seq_len", "seq_length", "sequence_length", "tokens"),
    "peak_allocated_gb": ("peak_allocated_gb", "peak_alloc_gb", "max_allocated_gb"),
    "peak_reserved_gb": ("peak_reserved_gb", "max_reserved_gb"),
}


def _get(row: dict[str, Any], key: str, default: Any = None) -> Any:
    for name in ALIASES.get(key, (key,)):
        if row.get(name) is not None:
            return row[name]
    return default


def _peak(value: Any) -> float:
    """A peak in GB: one number, or one per rank (the largest rank counts: every GPU must hold it)."""
    return float(max(value)) if isinstance(value, list | tuple) else float(value)


def tolerance() -> float:
    return float(json.loads(TABLE.read_text()).get("tolerance", 0.15))


def _rows_of(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [r for r in data if isinstance(r, dict)]
    if isinstance(data, dict):
        for key in ("rows", "results", "runs"):
            if isinstance(data.get(key), list):
                return [r for r in data[key] if isinstance(r, dict)]
    return []


def measured_rows() -> list[dict[str, Any]]:
    """Every row with a measured peak: the committed table, then the benchmark's result files."""
    rows = [
        dict(r, source=r.get("source", str(TABLE.relative_to(ROOT)))) for r in _rows_of(json.loads(TABLE.read_text()))
    ]
    for path in sorted(ROOT.glob(BENCH_GLOB)):
        for r in _rows_of(json.loads(path.read_text())):
            rows.append(dict(r, source=r.get("source", str(path.relative_to(ROOT)))))
    usable = []
    for r in rows:
        ok = r.get("model") and r.get("strategy") and not r.get("error") and not r.get("oom")
        ok = ok and r.get("status", "ok") == "ok"
        # The GPU feature cache grows with the dataset (not planned): such rows do not calibrate the estimate.
        ok = ok and r.get("sam_feature_cache", "none") != "gpu"
        if ok and (_get(r, "peak_allocated_gb") is not None or _get(r, "peak_reserved_gb") is not None):
            usable.append(r)
    return usable


@dataclass
class Comparison:
    """One measured row next to its estimate (GiB per GPU)."""

    row: dict[str, Any]
    measured: float
    estimated: float
    what: str  # allocated | reserved

    @property
    def error(self) -> float:
        return (self.estimated - self.measured) / self.measured

    def __str__(self) -> str:
        r = self.row
        return (
            f"{r['model']} {r['strategy']} x{r.get('devices', 1)} micro {_get(r, 'micro_batch')}: {self.what} "
            f"measured {self.measured:.2f} GB, estimated {self.estimated:.2f} GB ({100 * self.error:+.1f} %) "
            f"[{r.get('source')}]"
        )


def compare(row: dict[str, Any]) -> list[Comparison]:
    """The planner's estimate for a measured row, for each peak it has (allocated, reserved)."""
    overrides = [f"model={row['model']}", f"strategy={row['strategy']}"]
    if row.get("lora"):
        overrides.append(f"lora={row['lora']}")
    if row.get("image_size"):
        overrides.append(f"data.image_size={row['image_size']}")
    devices = int(row.get("devices", 1))
    grad_ckpt = bool(_get(row, "grad_ckpt", True))
    overrides += [f"trainer.devices={devices}", f"model.gradient_checkpointing={str(grad_ckpt).lower()}"]
    overrides += list(row.get("overrides", []))
    cfg = load_for_planning(overrides)
    facts, model, tokenizer = model_facts(cfg)
    seq = sequence_facts(cfg, model, tokenizer)
    if _get(row, "seq_len"):  # the benchmark's own prompt: keep the image tokens, match the length
        seq = replace(seq, text_tokens=max(round(float(_get(row, "seq_len"))) - seq.image_tokens, 0))
    setting = Setting(
        row["strategy"],
        devices,
        int(_get(row, "micro_batch", cfg.data.batch_size)),
        int(_get(row, "accumulate", 1)),
        grad_ckpt,
        str(row.get("precision", cfg.trainer.get("precision", "bf16-mixed"))),
    )
    e = estimate(facts, seq, setting)
    out = []
    if _get(row, "peak_allocated_gb") is not None:
        out.append(Comparison(row, _peak(_get(row, "peak_allocated_gb")), e.allocated / GB, "allocated"))
    if _get(row, "peak_reserved_gb") is not None:
        out.append(Comparison(row, _peak(_get(row, "peak_reserved_gb")), e.reserved / GB, "reserved"))
    return out
