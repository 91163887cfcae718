"""Data-loader throughput: samples/s of the training pipeline alone (decode, resize, augment, both image
branches, tokenise, collate), for a real-size model's preprocessing (SAM-2 at 1024 px, InternVL 448-px tiles).

The images are written first as DRIVE-like files (565x584 RGB TIF + GIF masks + GIF fields of view, generated
vessels), so the benchmark needs no dataset and measures real decoding. Usage:

    python bench/loader.py [--model sa2va_4b] [--workers 0 2 4 8] [--batches 40] [--out results.json]

Run it under `taskset -c 0,1` to measure a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_images(folder: Path, count: int) -> None:
    from vseg.data.synthetic import generate_vessels

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "fov").mkdir()
    for i in range(count):
        image, mask = generate_vessels(seed=i, size=584, style="fundus")
        image, mask = image[:, :565], mask[:, :565]  # DRIVE's 565x584
        Image.fromarray(image).save(folder / "images" / f"{i:03d}.tif")
        Image.fromarray(mask.astype(np.uint8) * 255).save(folder / "masks" / f"{i:03d}.gif")
        Image.fromarray(np.full(mask.shape, 255, np.uint8)).save(folder / "fov" / f"{i:03d}.gif")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sa2va_4b")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from vseg.config import load_config
    from vseg.data.datamodule import VesselDataModule
    from vseg.model.processor import Sa2VAProcessor
    from vseg.model.sizes import build_on_meta

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_images(Path(tmp), args.images)
        overrides = [
            f"model={args.model}",
            "data=folders",
            f"data.root={tmp}",
            r"data.image_pattern='images/(?P<id>\d+)\.tif'",
            "data.mask_pattern='masks/{id}.gif'",
            "data.fov_pattern='fov/{id}.gif'",
            "data.image_size=512",
            "data.repeats=50",
            f"data.batch_size={args.batch_size}",
            "data.augment.enabled=true",
            "data.augment.scale=[0.9,1.2]",
            "data.augment.brightness=0.15",
            "data.augment.contrast=0.15",
            "data.augment.gamma=[0.8,1.25]",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = load_config(compose(config_name="train", overrides=overrides))
        model, tokenizer = build_on_meta(cfg.model, None)  # shapes only: the processor reads sizes off it
        processor = Sa2VAProcessor.for_model(model, tokenizer, cfg.model, cfg.data.max_length)
        for workers in args.workers:
            cfg.data.num_workers = workers
            dm = VesselDataModule(cfg.data, processor)
            dm.setup("fit")
            loader = dm.train_dataloader()
            iterator = iter(loader)
            next(iterator)  # worker start-up is not throughput
            start = time.perf_counter()
            n = 0
            for _ in range(args.batches):
                batch = next(iterator)
                n += len(batch["ids"])
            seconds = time.perf_counter() - start
            row = {
                "model": args.model,
                "workers": workers,
                "cpus": len(os.sched_getaffinity(0)),
                "batch_size": args.batch_size,
                "samples": n,
                "samples_per_s": n / seconds,
                "sam_size": processor.sam_size,
                "torch_threads": torch.get_num_threads(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del iterator, loader
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
