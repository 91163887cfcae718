"""Prediction throughput (images/s) for 512x512 inputs with the real Sa2VA shapes and random weights.

Parts (each writes its numbers into --out as JSON; BENCHMARKS.md "## Prediction" holds the table):

* `forward`  the model alone on one GPU: one pre-encoded batch of `--batch` images through the fast path
             (teacher-forced [SEG], SAM-2 encoder + mask decoder, masks upsampled to 512x512 and copied to the
             host), timed over `--iters` batches after a warm-up, then the same pass part by part. Comparable
             with the DESIGN anchor (plain batched forward, batch 32: 1B 62, 4B 41, 8B 30 images/s on one H200).
* `single`   the whole of `predict.py` in one process on one GPU over a folder of PNGs: loader workers, model,
             mask/overlay PNGs, results.jsonl (`images_per_second` = the prediction loop; end to end includes
             building the model).
* `dp`       `python predict.py ... devices=N` as a subprocess for each N of `--gpus` (N > 1: Lightning DDP, one
             process per GPU; N = 1: the one-GPU path on the same inputs, the ratio's reference); wall clock of
             the whole command (start-up and model build included) and the loop's images/s.
* `mp`       `device_map=balanced max_memory={0: 12GB, 1: 12GB}` (model-parallel) vs one GPU on the same inputs
             and weights: speed, peak memory per GPU, and mask agreement.
* `fast`     one model converted step by step (`bench/predict_fast.py`): bf16 eager, FP8, FP8 + compiled with
             `--compile-mode` (CUDA graphs by default): forward images/s at `--batch`, batch-1 latency, logit error
             and mask agreement against bf16, and predict.py on `--single-images` PNGs eager and FP8 + compiled,
             with ratios.
* `targets`  several targets per image (`targets=`): for each N of `--targets`, one pre-encoded batch of
             `--batch` images x N targets (N rows per image) through `Predictor` as predict.py runs it, timed like
             `forward`: images/s and (image x target) rows/s. With N > 1 also the same rows with the vision
             encoder and SAM-2 run for every row (what sharing them per image saves), and whether both give the
             same masks.

`--compile off on` runs forward, single and dp without and with `compile=true`; `single` then also compares
the masks of the two. `--shapes tiny` is a smoke run that works on the CPU too.

    python bench/predict.py --parts forward single dp mp --shapes 1b 4b 8b --gpus 1 4 --compile off on \
        --out bench/results/predict.json
    python bench/predict.py --parts targets --shapes 4b --targets 1 3 --out bench/results/predict_targets.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"1b": "sa2va_1b", "4b": "sa2va_4b", "8b": "sa2va_8b", "tiny": "tiny"}  # tiny: a CPU smoke run


def write_inputs(folder: Path, count: int, distinct: int = 32) -> None:
    """`count` 512x512 angiogram-like PNGs (`distinct` generated ones, copied round-robin)."""
    from vseg.data.synthetic import generate_vessels

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(min(distinct, count)):
        image, _ = generate_vessels(seed=i, size=512, style="angiogram")
        Image.fromarray(image).save(folder / f"img_{i:05d}.png")
    for i in range(distinct, count):
        shutil.copyfile(folder / f"img_{i % distinct:05d}.png", folder / f"img_{i:05d}.png")


def predict_cfg(**values):
    from omegaconf import OmegaConf

    from vseg.config import compose

    overrides = [f"model={values.pop('model')}"] if "model" in values else []
    cfg = compose("predict", overrides)
    return OmegaConf.merge(cfg, values)


def bench_forward(shape: str, batch: int, iters: int, compile_blocks: bool = False) -> dict:
    import torch

    from vseg.inference.inputs import collate, file_items
    from vseg.inference.predictor import Predictor

    tmp = Path(tempfile.mkdtemp())
    write_inputs(tmp / "in", batch, distinct=min(batch, 8))
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    predictor = Predictor.load("random", model=SHAPES[shape], device=device, compile=compile_blocks)
    model, processor, engine = predictor.model, predictor.processor, predictor.engine()
    sync()
    build = time.perf_counter() - t0
    items = file_items(str(tmp / "in"), "Please segment the blood vessels in this image.")
    data = predictor.dataset(items)
    b = collate(processor, [data[i] for i in range(batch)])
    tokens = int(b["attention_mask"].sum(1).float().mean())
    for key in ("input_ids", "attention_mask", "sam_pixel_values"):
        b[key] = b[key].to(device)
    b["mllm_inputs"] = {k: v.to(device) for k, v in b["mllm_inputs"].items()}
    t0 = time.perf_counter()
    for _ in range(2):
        engine(b)
    sync()
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        engine(b)
    sync()
    seconds = time.perf_counter() - t0
    # The same pass part by part (synchronised after each): where a batch's time goes.
    parts = dict.fromkeys(("vision_llm", "sam_encoder", "mask_decoder", "finish"), 0.0)
    marks: list[float] = []

    def mark() -> None:
        sync()
        marks.append(time.perf_counter())

    with torch.inference_mode():
        for _ in range(iters):
            marks.clear()
            mark()
            hidden = model.decoder_states(b["input_ids"], b["attention_mask"], b["mllm_inputs"])
            prompts, index = model.seg_embeddings(hidden, b["input_ids"])
            mark()
            features = model.grounding.encode(b["sam_pixel_values"])
            mark()
            logits = model.grounding.decode(features, prompts, index)
            mark()
            index = index.to(logits.device)
            engine.finish([logits[index == i] for i in range(batch)], b["image_sizes"], [""] * batch)
            mark()
            for name, a, z in zip(parts, marks, marks[1:], strict=False):
                parts[name] += (z - a) * 1e3 / iters
    result = {
        "shape": shape,
        "batch": batch,
        "compile": compile_blocks,
        "tokens_per_image": tokens,
        "images_per_second": batch * iters / seconds,
        "ms_per_batch_by_part": {k: round(v, 1) for k, v in parts.items()},
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        "build_seconds": build,
        "warmup_seconds": warmup,  # with compile: includes compiling every block
    }
    del model, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def bench_targets(shape: str, batch: int, iters: int, counts: list[int]) -> list[dict]:
    """`targets` part: images/s and rows/s with N targets per image, the vision encoder shared or per row."""
    import torch

    from vseg.data.synthetic import generate_vessels
    from vseg.inference.engine import to_device
    from vseg.inference.inputs import PredictItem
    from vseg.inference.predictor import Predictor

    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    pictures = [generate_vessels(seed=i, size=512, style="angiogram")[0] for i in range(min(batch, 8))]
    items = [PredictItem(i, f"img{i}", "", pixels=pictures[i % len(pictures)]) for i in range(batch)]
    predictor = Predictor.load("random", model=SHAPES[shape], device=device)
    engine = predictor.engine()
    phrases = ("arteries", "veins", "stenoses", "catheter", "bifurcations", "collaterals")

    def timed(run) -> tuple[float, list]:
        for _ in range(2):
            run()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = run()
        sync()
        return (time.perf_counter() - t0) / iters, out

    rows = []
    for n in counts:
        targets = {f"t{i}": f"Please segment the {phrases[i % len(phrases)]} in this image." for i in range(n)}
        data = predictor.dataset(items, targets=targets)
        b = to_device(data.collate([data[i] for i in range(batch)]), device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds, shared = timed(lambda b=b: predictor(b))
        row = {
            "shape": shape,
            "images": batch,
            "targets": n,
            "rows": batch * n,
            "tokens_per_row": int(b["attention_mask"].sum(1).float().mean()),
            "images_per_second": batch / seconds,
            "rows_per_second": batch * n / seconds,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None,
        }
        if n > 1:  # the same rows, each with its own vision-encoder and SAM-2 pass
            per_row = {
                **b,
                "mllm_inputs": {k: v.to(device) for k, v in predictor.model.family.collate(b["mllm_single"]).items()},
                "sam_pixel_values": b["sam_pixel_values"][b["row_image"].to(device)],
            }
            sizes = [tuple(s) for s in b["image_sizes"]]

            def per_row_pass(p=per_row, sizes=sizes):
                with torch.inference_mode():
                    logits = engine.seg_logits(p["input_ids"], p["attention_mask"], p)
                return engine.finish(logits, sizes, [engine.answer] * len(logits))

            seconds_rows, alone = timed(per_row_pass)
            flat = [target for per_image in shared for target in per_image.values()]
            row["per_row_vision"] = {
                "images_per_second": batch / seconds_rows,
                "rows_per_second": batch * n / seconds_rows,
                "speedup_of_sharing": seconds_rows / seconds,
                "masks_equal": sum(bool(np.array_equal(x.mask, y.mask)) for x, y in zip(flat, alone, strict=True)),
                "masks": len(flat),
            }
        rows.append(row)
    return rows


def bench_single(
    shape: str,
    batch: int,
    images: Path,
    workers: int,
    compile_blocks: bool,
    writers: int,
    keep: Path | None = None,
    **options,
) -> dict:
    from vseg.predict import run

    out = (keep or Path(tempfile.mkdtemp())) / "out"
    t0 = time.perf_counter()
    s = run(
        predict_cfg(
            ckpt="random",
            model=SHAPES[shape],
            input=str(images),
            output=str(out),
            batch_size=batch,
            num_workers=workers,
            writer_threads=writers,
            compile=compile_blocks,
            **options,
        )
    )
    wall = time.perf_counter() - t0
    if keep is None:
        shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "shape": shape,
        "batch": batch,
        "compile": compile_blocks,
        **options,
        "workers": workers,
        "writer_threads": writers,
        "images": s["images"],
        "images_per_second": s["images_per_second"],
        "end_to_end_seconds": wall,
        "load_seconds": s["seconds_load"],
        "loop_seconds": {k: s.get(f"seconds_{k}") for k in ("inputs", "model", "writing")},
    }


def mask_agreement(a: Path, b: Path) -> dict:
    """Pixel agreement and Dice between two output folders' masks (same inputs)."""
    agree, dice = [], []
    for path in sorted((a / "masks").glob("*.png")):
        x = np.asarray(Image.open(path)) > 0
        y = np.asarray(Image.open(b / "masks" / path.name)) > 0
        agree.append(float((x == y).mean()))
        dice.append(1.0 if not (x.any() or y.any()) else 2 * float((x & y).sum()) / float(x.sum() + y.sum()))
    return {"masks": len(agree), "pixel_agreement_min": min(agree), "dice_mean": float(np.mean(dice))}


def bench_dp(shape: str, batch: int, images: Path, gpus: int, workers: int, compile_blocks: bool, writers: int) -> dict:
    out = Path(tempfile.mkdtemp()) / "out"
    command = [
        sys.executable,
        str(ROOT / "predict.py"),
        "ckpt=random",
        f"model={SHAPES[shape]}",
        f"input={images}",
        f"output={out}",
        f"devices={gpus}",
        f"batch_size={batch}",
        f"num_workers={workers}",
        f"writer_threads={writers}",
        f"compile={str(compile_blocks).lower()}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"shape": shape, "error": proc.stderr[-3000:]}
    s = json.loads((out / "summary.json").read_text())
    lines = (out / "results.jsonl").read_text().splitlines()
    ids = [json.loads(x)["id"] for x in lines]
    shutil.rmtree(out.parent, ignore_errors=True)
    return {
        "shape": shape,
        "gpus": gpus,
        "batch": batch,
        "images": s["images"],
        "ok": s["ok"],
        "in_input_order": ids == sorted(ids),
        "images_per_second": s["images_per_second"],
        "end_to_end_seconds": wall,
        "loop_seconds_rank0": {k: s.get(f"seconds_{k}") for k in ("inputs", "model", "writing")},
        "command": " ".join(command[1:]),
    }


def bench_mp(shape: str, batch: int, images: Path, budget: str) -> dict:
    import torch

    from vseg.predict import run

    tmp = Path(tempfile.mkdtemp())
    results = {}
    for name, extra in (("single", {}), ("split", {"device_map": "balanced", "max_memory": {0: budget, 1: budget}})):
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)
        t0 = time.perf_counter()
        s = run(
            predict_cfg(
                ckpt="random",
                model=SHAPES[shape],
                input=str(images),
                output=str(tmp / name),
                batch_size=batch,
                num_workers=4,
                **extra,
            )
        )
        results[name] = {
            "images_per_second": s["images_per_second"],
            "end_to_end_seconds": time.perf_counter() - t0,
            "peak_gb_per_gpu": [
                round(torch.cuda.max_memory_allocated(i) / 1e9, 2) for i in range(torch.cuda.device_count())
            ],
        }
        torch.cuda.empty_cache()
    agreement = mask_agreement(tmp / "single", tmp / "split")
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "shape": shape,
        "max_memory_per_gpu": budget,
        **results,
        "mask_pixel_agreement_min": agreement["pixel_agreement_min"],
        "mask_dice_single_vs_split_mean": agreement["dice_mean"],
    }


def main() -> None:
    from bench.predict_fast import STEPS as FAST_STEPS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", default=["forward", "single", "dp", "mp"], help="forward single dp mp fast targets"
    )
    parser.add_argument("--shapes", nargs="+", default=["1b", "4b", "8b"])
    parser.add_argument("--dp-shapes", nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--images", type=int, default=1220)
    parser.add_argument("--single-images", type=int, default=512)
    parser.add_argument("--mp-images", type=int, default=64)
    parser.add_argument("--gpus", type=int, nargs="+", default=[4], help="dp: devices= of each run (1 = one GPU)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--writer-threads", type=int, default=4)
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        choices=["off", "on"],
        help="compile= variants to run (forward, single, dp)",
    )
    parser.add_argument("--resize", default="pil", choices=["pil", "torch"], help="single: predict.py's resize=")
    parser.add_argument("--compile-mode", default="reduce-overhead", help="fast: compile_mode of the compiled step")
    parser.add_argument("--fast-steps", nargs="+", default=list(FAST_STEPS), choices=FAST_STEPS)
    parser.add_argument("--fast-fp8", default="on", choices=["on", "off"], help="fast: compiled steps on the fp8 model")
    parser.add_argument("--latency-iters", type=int, default=30, help="fast: timed batch-1 passes")
    parser.add_argument("--targets", type=int, nargs="+", default=[1, 3], help="targets: targets per image")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict.json")
    args = parser.parse_args()
    import torch

    report = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus_visible": torch.cuda.device_count(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "parts": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(part: str, row: dict) -> None:
        report["parts"].setdefault(part, []).append(row)
        args.out.write_text(json.dumps(report, indent=2))
        print(part, json.dumps(row), flush=True)

    tmp = Path(tempfile.mkdtemp())
    folder = tmp / "inputs"
    small = tmp / "small"
    small.mkdir()
    if {"single", "dp", "mp", "fast"} & set(args.parts):  # the parts that read PNG folders
        write_inputs(folder, args.images)
        for i in range(args.single_images):
            os.link(folder / f"img_{i:05d}.png", small / f"img_{i:05d}.png")
    variants = [v == "on" for v in args.compile]
    for shape in args.shapes:
        if "fast" in args.parts:
            from bench.predict_fast import bench_fast

            bench_fast(
                SHAPES[shape],
                args.batch,
                args.iters,
                args.latency_iters,
                small,
                args.workers,
                args.writer_threads,
                args.compile_mode,
                save,
                functools.partial(bench_single, shape),
                args.fast_steps,
                args.fast_fp8 == "on",
            )
        if "targets" in args.parts:
            for row in bench_targets(shape, args.batch, args.iters, args.targets):
                save("targets", row)
        if "forward" in args.parts:
            for flag in variants:
                save("forward", bench_forward(shape, args.batch, args.iters, flag))
        if "single" in args.parts:
            outs = {}
            for flag in variants:
                outs[flag] = tmp / f"single_{shape}_{flag}"
                outs[flag].mkdir()
                save(
                    "single",
                    bench_single(
                        shape,
                        args.batch,
                        small,
                        args.workers,
                        flag,
                        args.writer_threads,
                        outs[flag],
                        resize=args.resize,
                    ),
                )
            if len(outs) == 2:
                save(
                    "single_compile_vs_eager",
                    {"shape": shape, **mask_agreement(outs[False] / "out", outs[True] / "out")},
                )
            for folder_ in outs.values():
                shutil.rmtree(folder_, ignore_errors=True)
    for shape in args.dp_shapes or args.shapes:
        if "dp" in args.parts:
            for gpus in args.gpus:
                for flag in variants:
                    save("dp", bench_dp(shape, args.batch, folder, gpus, args.workers, flag, args.writer_threads))
    if "mp" in args.parts:
        mp = tmp / "mp"
        mp.mkdir()
        for i in range(args.mp_images):
            os.link(folder / f"img_{i:05d}.png", mp / f"img_{i:05d}.png")
        save("mp", bench_mp("8b", 8, mp, "12GB"))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
