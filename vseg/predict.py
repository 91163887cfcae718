"""`predict.py`'s body: a run directory -> the same model -> masks, per-image metrics and a summary.

The model is rebuilt from the run's own `config.yaml` (a random-init base is reproduced from the run's seed;
a released checkpoint base comes from `model.path`) and its trainable weights are loaded from
`weights/trainable.safetensors`, every key checked. Samples go through the same processor as in training,
with the answer teacher-forced ("It is [SEG].") so one batched forward yields every mask.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from vseg.config import ConfigError, TrainConfig
from vseg.data.datamodule import VesselDataModule
from vseg.metrics import dice_iou_per_image, logits_to_mask
from vseg.model.build import build_sa2va
from vseg.model.processor import Sa2VAProcessor
from vseg.model.sa2va import Sa2VA

log = logging.getLogger(__name__)


def load_run(run_dir: Path) -> tuple[TrainConfig, dict[str, torch.Tensor]]:
    """The run's typed config and trainable weights; a ConfigError says what is missing."""
    config_file, weights_file = run_dir / "config.yaml", run_dir / "weights" / "trainable.safetensors"
    for path in (config_file, weights_file):
        if not path.is_file():
            raise ConfigError(
                f"ckpt={run_dir}: {path.name} not found at {path}; pass a finished training run directory"
            )
    raw = OmegaConf.load(config_file)
    cfg: TrainConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), raw))  # type: ignore[assignment]
    return cfg, load_file(weights_file)


def rebuild_run(run_dir: Path) -> tuple[TrainConfig, Sa2VA, PreTrainedTokenizerBase]:
    """The run's model as training left it: base rebuilt (seeded random init, or `model.path`), trained weights in."""
    cfg, weights = load_run(run_dir)
    L.seed_everything(cfg.seed, verbose=False)  # reproduces a random-init base exactly as training built it
    model, tokenizer = build_sa2va(cfg.model, cfg.lora)
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise ConfigError(
            f"{run_dir}/weights/trainable.safetensors does not match the model of its config.yaml "
            f"(missing {sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]})"
        )
    model.load_state_dict(weights, strict=False)
    return cfg, model, tokenizer


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def run(pcfg: DictConfig) -> dict[str, Any]:
    """Predicts the chosen split of a run's data; returns the summary that is also written to summary.json."""
    run_dir = Path(pcfg.ckpt).resolve()
    if not run_dir.is_dir():
        raise ConfigError(f"ckpt={pcfg.ckpt}: not a directory; pass a training run directory")
    if pcfg.split not in ("val", "train"):
        raise ConfigError(f"split={pcfg.split!r}: expected val or train")
    out = Path(pcfg.out).resolve() if pcfg.out else run_dir / "predictions"
    if out.exists() and any(out.iterdir()) and not pcfg.overwrite:
        raise ConfigError(f"out={out} is not empty; pass overwrite=true or another out=")
    cfg, model, tokenizer = rebuild_run(run_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
    data = VesselDataModule(cfg.data, processor)
    data.setup("predict")
    dataset = data.val_set if pcfg.split == "val" else data.train_set
    (out / "masks").mkdir(parents=True, exist_ok=True)
    records, start = [], time.perf_counter()
    with _AtomicLines(out / "results.jsonl") as results, torch.inference_mode():
        for begin in tqdm(range(0, len(dataset), pcfg.batch_size), desc="predict", unit="batch"):
            batch = processor.collate([dataset[i] for i in range(begin, min(begin + pcfg.batch_size, len(dataset)))])
            o = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["labels"],
                batch["sam_pixel_values"],
                batch["mllm_inputs"],
            )
            for i, sample_id in enumerate(batch["ids"]):
                truth = batch["masks"][i]
                logits = o.mask_logits[o.seg_sample_index.to(o.mask_logits.device) == i]
                pred = logits_to_mask(logits, tuple(truth.shape[-2:]), pcfg.threshold).cpu()
                dice, iou = dice_iou_per_image(pred, truth)
                mask_path = out / "masks" / f"{sample_id}.png"
                image = Image.fromarray(pred[0].numpy().astype(np.uint8) * 255)
                _atomic_write(mask_path, lambda p, im=image: im.save(p, format="PNG"))
                record = {
                    "id": sample_id,
                    "mask": str(mask_path.relative_to(out)),
                    "dice": float(dice[0]),
                    "iou": float(iou[0]),
                    "foreground": float(pred.float().mean()),
                    "mean_logit": float(logits.float().mean()),
                }
                results.write(json.dumps(record) + "\n")
                records.append(record)
    seconds = time.perf_counter() - start
    summary = {
        "run_dir": str(run_dir),
        "split": pcfg.split,
        "images": len(records),
        "dice": float(np.mean([r["dice"] for r in records])) if records else None,
        "iou": float(np.mean([r["iou"] for r in records])) if records else None,
        "seconds": seconds,
        "images_per_second": len(records) / seconds if seconds > 0 else None,
    }
    _atomic_write(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    print(f"\n{len(records)} masks in {out}  dice {summary['dice']:.4f}  iou {summary['iou']:.4f}", flush=True)
    return summary


class _AtomicLines:
    """Writes results.jsonl through a temporary file that replaces the target only when complete."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")

    def __enter__(self):
        self.handle = self.tmp.open("w")
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        self.handle.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
