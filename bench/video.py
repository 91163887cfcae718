"""Run (video) throughput and memory: frames/s of `Predictor.predict_video` vs images/s of the image path.

A real-size Sa2VA with random weights (`--model`, a conf/model preset; `--set` overrides its fields) predicts a
synthetic angiography run (`--frames` frames of `--size` px: one synthetic vessel image drifting a pixel per
frame), with `--key-frames` key frames through the MLLM and SAM-2 tracking every frame with its memory.
Reported, per `--frames-on` (cpu: frames wait on the host and are streamed; gpu: all kept on the GPU):

* `frames_per_second`   the whole run (MLLM on the key frames + tracking), after a short warm-up run;
* `mllm_seconds` / `tracking_seconds`;
* `peak_gb`: the peak CUDA memory of the run (weights included; `weights_gb` alone);
* `allocated_gb`: CUDA memory in use at ten frames spread over the run, `[frame, GB]` each;
* `gb_per_frame`: the growth of that memory per tracked frame (a least-squares slope from the first tracked
  frame on): what each further frame keeps (~0: old memories are dropped, frames come one at a time);
* `stored_gb_per_frame`: memory in use once tracking starts minus before the run, per frame (gpu: the frames
  kept there, 3 x S x S bytes each at SAM-2's size S; cpu: ~0);
* `image_path_images_per_second`: `Predictor.predict` on the first `--image-frames` frames as stills.

    python bench/video.py --model sa2va_4b --frames 60 --size 512 --out bench/results/video_4b.json
    python bench/video.py --model sa2va_4b --frames 500 --size 512 --out bench/results/video_4b_500.json
    # a CPU check of the script (the tiny preset widened so it can track):
    python bench/video.py --model tiny --frames 12 --size 64 --key-frames 2 --image-frames 4 --set \
        sam2.vision_config.fpn_hidden_size=64 sam2.prompt_encoder_config.hidden_size=64 \
        sam2.mask_decoder_config.hidden_size=64 sam2.memory.memory_attention_num_layers=1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vseg.artifacts.sources import preset  # noqa: E402
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


def allocated() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def timed_run(predictor: Predictor, run: Run, keys: int, frames_on: str) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    before = allocated()
    probes = set(np.linspace(0, len(run) - 1, 10).round().astype(int).tolist())
    used: dict[int, float] = {}

    def on_frame(t: int) -> None:
        used[t] = allocated()  # every frame (cheap); ten of them are reported

    start = time.perf_counter()
    out = predict_run(predictor, run, PROMPT, keys, "first", frames_on, on_frame=on_frame)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    tracked = sorted(t for t in used if t not in out.key_frames)
    slope = float(np.polyfit(tracked, [used[t] for t in tracked], 1)[0]) if len(tracked) > 1 else 0.0
    first = used[tracked[0]] if tracked else before
    return {
        "frames": len(run),
        "seconds": seconds,
        "frames_per_second": len(run) / seconds,
        "mllm_seconds": out.seconds["mllm"],
        "tracking_seconds": out.seconds["tracking"],
        "peak_gb": peak,
        "allocated_gb": [[t, round(used[t], 4)] for t in sorted(probes & used.keys())],
        "gb_per_frame": slope,
        "stored_gb_per_frame": (first - before) / len(run),
        "foreground": float(out.masks.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sa2va_4b")
    parser.add_argument("--set", nargs="*", default=[], help="model fields, e.g. sam2.vision_config.fpn_hidden_size=64")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--key-frames", type=int, default=5)
    parser.add_argument("--frames-on", nargs="+", default=["cpu", "gpu"], choices=["cpu", "gpu"])
    parser.add_argument("--batch", type=int, default=32, help="image path batch size")
    parser.add_argument("--image-frames", type=int, default=64, help="frames the image path predicts as stills")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "video.json")
    args = parser.parse_args()

    model = preset(args.model)
    if args.set:
        model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(model), OmegaConf.from_dotlist(args.set)))
    started = time.perf_counter()
    predictor = Predictor.load("random", model=model, device=args.device)
    run = synthetic_run(args.frames, args.size)
    result: dict = {
        "model": args.model,
        "set": args.set,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "dtype": predictor.dtype,
        "frames": args.frames,
        "size": args.size,
        "key_frames": args.key_frames,
        "load_seconds": time.perf_counter() - started,
        "weights_gb": allocated() if torch.cuda.is_available() else None,
    }
    warm = min(8, args.frames)
    timed_run(predictor, Run(run.id, run.source, run.frames[:warm], run.names[:warm], run.fps), args.key_frames, "cpu")
    for where in args.frames_on:
        full = timed_run(predictor, run, args.key_frames, where)
        result[f"frames_on_{where}"] = full
        print(where, json.dumps({k: v for k, v in full.items() if k != "allocated_gb"}), flush=True)
    frames = list(run.frames[: args.image_frames])
    predictor.predict(frames[: args.batch], PROMPT, batch_size=args.batch)  # warm-up
    sync()
    start = time.perf_counter()
    predictor.predict(frames, PROMPT, batch_size=args.batch)
    sync()
    result["image_path_images_per_second"] = len(frames) / (time.perf_counter() - start)
    brief = {
        k: {n: v for n, v in x.items() if n != "allocated_gb"} if isinstance(x, dict) else x for k, x in result.items()
    }
    print(json.dumps(brief, indent=2))  # (allocated_gb in the file)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
