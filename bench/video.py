"""Run (video) throughput: frames/s of `Predictor.predict_video` vs images/s of the image path, same model.

A real-size Sa2VA with random weights (`--model`, a conf/model preset) predicts a synthetic angiography run
(`--frames` frames of `--size` px: one synthetic vessel image drifting a pixel per frame), with `--key-frames`
key frames through the MLLM and SAM-2 tracking every frame with its memory. Reported, per `--frames-on`:

* `frames_per_second`   the whole run (MLLM on the key frames + tracking), after a warm-up run;
* `mllm_seconds` / `tracking_seconds`;
* `peak_gb` and `gb_per_frame`: the peak CUDA memory of the run, and its growth per frame between a run of
  half the length and the full one (memory kept per frame; ~0 when frames stream from the CPU and old
  memories are dropped);
* `image_path_images_per_second`: `Predictor.predict` on the same frames as stills (batch `--batch`).

    python bench/video.py --model sa2va_4b --frames 60 --size 512 --frames-on cpu gpu --out bench/results/video_4b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vseg.data.runs import Run, frame_names  # noqa: E402
from vseg.data.synthetic import generate_vessels  # noqa: E402
from vseg.inference.predictor import Predictor  # noqa: E402
from vseg.inference.video import predict_run  # noqa: E402

PROMPT = "Please segment the blood vessels in this image."


def synthetic_run(frames: int, size: int) -> Run:
    image, _ = generate_vessels(seed=7, size=size + frames, style="angiogram")
    stack = np.stack([image[i // 2 : i // 2 + size, i : i + size] for i in range(frames)])
    return Run("bench", "<synthetic>", np.ascontiguousarray(stack), frame_names(frames), fps=15.0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_run(predictor: Predictor, run: Run, keys: int, frames_on: str) -> dict[str, float]:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    out = predict_run(predictor, run, PROMPT, keys, "first", frames_on)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return {
        "frames": len(run),
        "seconds": seconds,
        "frames_per_second": len(run) / seconds,
        "mllm_seconds": out.seconds["mllm"],
        "tracking_seconds": out.seconds["tracking"],
        "peak_gb": peak,
        "foreground": float(out.masks.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sa2va_4b")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--key-frames", type=int, default=5)
    parser.add_argument("--frames-on", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=32, help="image path batch size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "video.json")
    args = parser.parse_args()

    predictor = Predictor.load("random", model=args.model, device=args.device)
    run = synthetic_run(args.frames, args.size)
    half = Run(run.id, run.source, run.frames[: args.frames // 2], run.names[: args.frames // 2], run.fps)
    result: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": predictor.dtype,
        "frames": args.frames,
        "size": args.size,
        "key_frames": args.key_frames,
        "weights_gb": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    timed_run(predictor, Run(run.id, run.source, run.frames[:8], run.names[:8], run.fps), args.key_frames, "cpu")
    for where in args.frames_on:
        small = timed_run(predictor, half, args.key_frames, where)
        full = timed_run(predictor, run, args.key_frames, where)
        full["gb_per_frame"] = (full["peak_gb"] - small["peak_gb"]) / max(len(run) - len(half), 1)
        result[f"frames_on_{where}"] = full
        print(where, json.dumps(full), flush=True)
    frames = list(run.frames)
    predictor.predict(frames[: args.batch], PROMPT, batch_size=args.batch)  # warm-up
    sync()
    start = time.perf_counter()
    predictor.predict(frames, PROMPT, batch_size=args.batch)
    sync()
    result["image_path_images_per_second"] = len(frames) / (time.perf_counter() - start)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
