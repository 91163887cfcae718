"""`bench/predict.py --parts fast`: bf16 eager vs FP8 vs compiled (CUDA graphs) + FP8 on one model, in one process.

One random-weight model is measured as it is converted in place, so every variant has the same weights:

1. bf16 eager: forward images/s at `--batch`, batch-1 latency, and the reference low-res logits and masks;
2. `predict.py` bf16 eager on the PNG folder (the loop's input share with the chunked feed);
3. FP8 (`Predictor.to_fp8`): forward images/s, batch-1 latency, logit error and mask agreement against (1);
4. compiled with `compile_mode` (default reduce-overhead: CUDA graphs) on top of FP8: forward images/s and
   agreement at `--batch`;
5. `predict.py fp8=true compile=true compile_mode=...` on the same folder (the blocks' compiled code is reused
   from step 4, so this is the steady state, not a cold start);
6. the compiled FP8 model's batch-1 latency (the blocks compile once more for the new batch size).

`--fast-steps` picks and orders the steps (`STEPS`); `--fast-fp8 off` compiles the bf16 model instead. Each
step's row is saved as it completes (a timed-out call keeps the finished rows); a failing step records its
error and the next step runs.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

#: the steps, in their default order (`--fast-steps` picks and orders them)
STEPS = ("bf16", "predict_bf16", "fp8", "compiled", "predict_compiled", "batch1")


def _timed(fn: Callable[[], object], iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def _throughput(predictor, batch: dict, iters: int, warmup: int = 2) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        predictor(batch)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    times = _timed(lambda: predictor(batch), iters, 0)
    n = len(batch["items"])
    return {
        "images_per_second": n * iters / sum(times),
        "warmup_seconds": round(warm, 1),
        "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }


def _latency(predictor, batch: dict, iters: int, warmup: int = 3) -> dict:
    t0 = time.perf_counter()
    for _ in range(warmup):
        predictor(batch)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    ms = np.array(_timed(lambda: predictor(batch), iters, 0)) * 1e3
    return {
        "batch1_ms_median": round(float(np.median(ms)), 2),
        "batch1_ms_p90": round(float(np.percentile(ms, 90)), 2),
        "batch1_ms_min": round(float(ms.min()), 2),
        "batch1_warmup_seconds": round(warm, 1),
    }


@torch.inference_mode()
def _logits(predictor, batch: dict) -> list[torch.Tensor]:
    """Per input the low-res logits (K, 256, 256) as float32 copies (CUDA-graph outputs are reused)."""
    from vseg.inference import latency

    batch = latency.pad_tokens(batch, predictor.pad_tokens, predictor.tokenizer.pad_token_id)
    if predictor.cuda_graphs:
        latency.step_begin()
    engine = predictor.engine()
    return [x.float().clone() for x in engine.seg_logits(batch["input_ids"], batch["attention_mask"], batch)]


def _agreement(ref_logits, ref_masks, logits, masks) -> dict:
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(ref_logits, logits, strict=True)])
    scale = torch.cat([a.abs().flatten() for a in ref_logits])
    near = torch.cat([a.flatten() for a in ref_logits]).abs() < 0.5  # logits this close to 0 flip easily
    agree, dice = [], []
    for x, y in zip(ref_masks, masks, strict=True):
        agree.append(float((x == y).mean()))
        both = x.sum() + y.sum()
        dice.append(1.0 if both == 0 else 2 * float((x & y).sum()) / float(both))
    return {
        "logit_abs_err_mean": round(float(diff.mean()), 4),
        "logit_abs_err_max": round(float(diff.max()), 3),
        "logit_ref_abs_mean": round(float(scale.mean()), 3),
        "logit_rel_err": round(float(diff.mean() / scale.mean()), 4),
        "ref_logits_within_0.5_of_threshold": round(float(near.float().mean()), 3),
        "pixel_agreement_min": round(min(agree), 5),
        "pixel_agreement_mean": round(float(np.mean(agree)), 5),
        "dice_mean": round(float(np.mean(dice)), 5),
        "dice_min": round(min(dice), 5),
        "ref_foreground_fraction": round(float(np.mean([m.mean() for m in ref_masks])), 4),
    }


def bench_fast(
    shape: str,
    batch_size: int,
    iters: int,
    latency_iters: int,
    pngs: Path,
    workers: int,
    writers: int,
    compile_mode: str,
    save: Callable[[str, dict], None],
    run_single: Callable[..., dict],
    steps: Sequence[str] = STEPS,
    fp8_compiled: bool = True,
) -> None:
    """Runs `steps` (of `STEPS`, in the order given) for `shape`, saving one row per step through `save`.

    `fp8_compiled`: the compiled steps run on the FP8 model (converted first if the `fp8` step did not run);
    False: on the bf16 model (then the `fp8` step must not run before them).
    """
    from vseg.inference.engine import to_device
    from vseg.inference.inputs import collate, file_items
    from vseg.inference.predictor import Predictor

    device = torch.device("cuda:0")
    t0 = time.perf_counter()
    predictor = Predictor.load("random", model=shape, device=device)
    build = time.perf_counter() - t0
    items = file_items(str(pngs), "Please segment the blood vessels in this image.")[:batch_size]
    data = predictor.dataset(items)
    samples = [data[i] for i in range(len(items))]
    big = to_device(collate(predictor.processor, samples), device)
    one = to_device(collate(predictor.processor, samples[:1]), device)
    tokens = int(big["attention_mask"].sum(1).float().mean())
    base = {"shape": shape, "batch": batch_size, "tokens_per_image": tokens, "build_seconds": round(build, 1)}
    rows: dict[str, dict] = {}

    def step(name: str, fn: Callable[[], dict]) -> None:
        t = time.perf_counter()
        try:
            row = {**base, "variant": name, **fn()}
        except Exception as err:  # noqa: BLE001 - a benchmark step's failure is recorded; the next one runs
            row = {
                **base,
                "variant": name,
                "error": f"{type(err).__name__}: {err}",
                "trace": traceback.format_exc()[-3000:],
            }
        row["step_seconds"] = round(time.perf_counter() - t, 1)
        rows[name] = row
        save("fast", row)

    ref: dict = {}
    state: dict = {"fp8": False, "compiled": None}

    def reference() -> dict:
        out = _throughput(predictor, big, iters)
        out.update(_latency(predictor, one, latency_iters))
        ref["logits"] = _logits(predictor, big)
        ref["masks"] = [p.mask for p in predictor(big)]
        return out

    def variant() -> dict:
        out = _throughput(predictor, big, iters)
        out.update(_latency(predictor, one, latency_iters))
        out.update(_agreement(ref["logits"], ref["masks"], _logits(predictor, big), [p.mask for p in predictor(big)]))
        return out

    def fp8() -> dict:
        state["fp8"] = True  # the compiled steps build on the converted model
        report = predictor.to_fp8()
        out = {"fp8_linear_layers": report.converted, "fp8_kept_bf16": len(report.kept)}
        return {**out, **variant()}

    def ensure_compiled() -> dict:
        out = {"compile_mode": compile_mode, "fp8": fp8_compiled}
        if state["compiled"] is None:
            if fp8_compiled and not state["fp8"]:
                state["fp8"] = True
                predictor.to_fp8()
            elif state["fp8"] and not fp8_compiled:
                raise ValueError("--fast-fp8 off: the fp8 step converted the model already; drop it from the steps")
            state["compiled"] = predictor.compile(compile_mode).blocks
            out["compiled_blocks"] = state["compiled"]
        return {**out, "pad_tokens": predictor.pad_tokens}

    def compiled() -> dict:  # its first passes compile every block (again, batch dynamic, after batch1)
        out = ensure_compiled()
        out.update(_throughput(predictor, big, iters))
        if ref:
            out.update(
                _agreement(ref["logits"], ref["masks"], _logits(predictor, big), [p.mask for p in predictor(big)])
            )
        return out

    def compiled_batch1() -> dict:
        return {**ensure_compiled(), **_latency(predictor, one, latency_iters)}

    tag = f"{'fp8' if fp8_compiled else 'bf16'}_compiled_{compile_mode}"
    table = {
        "bf16": ("bf16_eager", reference),
        "predict_bf16": ("predict_py_bf16_eager", lambda: run_single(batch_size, pngs, workers, False, writers)),
        "fp8": ("fp8_eager", fp8),
        "compiled": (tag, compiled),
        "predict_compiled": (
            f"predict_py_{tag}",
            lambda: run_single(batch_size, pngs, workers, True, writers, fp8=fp8_compiled, compile_mode=compile_mode),
        ),
        "batch1": (f"{tag}_batch1", compiled_batch1),
    }
    for key in steps:
        step(*table[key])
    summary: dict = {"shape": shape}
    eager, loop = rows.get("bf16_eager", {}), rows.get("predict_py_bf16_eager", {})
    for name, row in rows.items():
        if "error" in row or name in ("bf16_eager", "predict_py_bf16_eager"):
            continue
        base_ips = loop if name.startswith("predict_py") else eager
        if "images_per_second" in row and "images_per_second" in base_ips:
            summary[f"{name}_x_images_per_second"] = round(row["images_per_second"] / base_ips["images_per_second"], 2)
        if "batch1_ms_median" in row and "batch1_ms_median" in eager:
            summary[f"{name}_x_batch1_speedup"] = round(eager["batch1_ms_median"] / row["batch1_ms_median"], 2)
    save("fast_ratios", summary)
