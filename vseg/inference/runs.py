"""predict.py's body for runs (video, cine DICOM, stacks, frame folders): one device, a split model, or
data-parallel over devices.

The output folder is checked and fingerprinted as for images (`OutputStore.prepare`); runs already done are
skipped (resume); the rest are predicted on one device (`run_outputs.predict_runs`) or dealt out to one process
per device (`run_parallel`, `devices=N`), every run whole on one process. Then results.jsonl and summary.json
are written from every journal (`RunStore.finish`) and the outcome is printed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vseg.artifacts.files import check_writable
from vseg.config import ConfigError
from vseg.inference.outputs import OutputStore, outcome_lines
from vseg.inference.parallel import PLAN_ENV, read_plan, write_plan
from vseg.inference.predictor import DEFAULT_ANSWER, inference_dtype
from vseg.inference.run_outputs import RunStore, predict_runs
from vseg.inference.run_parallel import predict_runs_data_parallel
from vseg.model.tracking import narrow_sam

log = logging.getLogger(__name__)


def predict_run_inputs(opts, source, runs: list[tuple[str, Path]], load: Callable[[Any], Any], place) -> dict[str, Any]:
    """predict.py's body for runs: output folder checks, fingerprint, the runs (on one device, split by a
    device map, or data-parallel over `place.devices` processes), results and summary.

    Args:
        load: device -> the `Predictor` (predict.py's own loader, so runs and images load alike).
        place: predict.py's `Placement` (devices, accelerator, device, parallel, describe()).

    Returns:
        The summary; `{"rank": r}` on data-parallel ranks > 0.
    """
    begin = time.perf_counter()
    # A SAM-2 too narrow for memory is known from the config: refused before any model is loaded.
    width = ((source.model_cfg.sam2 or {}).get("vision_config") or {}).get("fpn_hidden_size")
    if width is not None and narrow_sam(int(width)):
        raise ConfigError(f"ckpt={source.describe()} cannot predict runs: {narrow_sam(int(width))}")
    out = opts.output_dir
    if out is None:
        if source.form != "run" or source.path is None:
            raise ConfigError("output= is required (only a run directory has a default: <run>/predictions)")
        out = source.path / "predictions"
    if out.is_dir() or not out.exists():
        check_writable(out, "prediction output (output=)")
    device = place.device
    answer_text = opts.answer_text or (source.train_cfg.data.answer if source.train_cfg else DEFAULT_ANSWER)
    generate = opts.answer_mode == "generate"
    fingerprint = {
        "ckpt": source.describe(),
        "answer": opts.answer_mode,
        "answer_text": None if generate else answer_text,
        "prompt": opts.prompt,
        "threshold": opts.threshold,
        "dtype": inference_dtype(opts.dtype, source, device),
        "key_frames": opts.key_frames,
        "key_frame_mode": opts.key_frame_mode,
        "overlay_format": opts.overlay_format if opts.overlays else None,
    }
    if generate:  # (absent otherwise, so folders written before generation for runs still resume)
        fingerprint["max_new_tokens"] = opts.max_new_tokens
    plan_file = os.environ.get(PLAN_ENV)
    child = place.parallel and plan_file is not None  # a rank launched by Lightning: the launcher planned
    store = RunStore(out, opts.overlays, opts.overlay_format)
    entries = [(i, run_id, path) for i, (run_id, path) in enumerate(runs)]
    if child:
        planned = set(read_plan(Path(plan_file)))
        todo = [e for e in entries if e[0] in planned]
    else:
        OutputStore.prepare(out, fingerprint, opts.overwrite)
        done = store.done()
        todo = [e for e in entries if e[1] not in done]
        if done:
            log.info("resuming: %d of %d runs already done in %s", len(done), len(runs), out)
    single = len(runs) == 1
    # No rank may be left without a run (Lightning refuses an empty loader): fewer runs, fewer processes. The
    # launched ranks see the same plan, so they agree on the count.
    devices = min(place.devices, len(todo)) if place.parallel else 1
    predict_seconds = 0.0
    if todo and devices > 1:
        if not child:  # the launching process fixes the plan every rank shards
            write_plan(out / "progress" / "plan.json", [e[0] for e in todo])
            os.environ[PLAN_ENV] = str(out / "progress" / "plan.json")
        try:
            rank, predict_seconds = predict_runs_data_parallel(
                load, todo, out, opts, single, place.accelerator, devices
            )
        finally:
            if not child:
                os.environ.pop(PLAN_ENV, None)
        if rank != 0:
            return {"rank": rank}
    elif todo:
        predict_seconds = predict_runs(lambda: load(device), todo, store, opts, single)
    records = store.records()
    frames = sum(
        records.get(e[1], {}).get("frames_total", 0) for e in todo if records.get(e[1], {}).get("status") == "ok"
    )
    timing = {
        "predicted_now": len(todo),
        "skipped_done": len(runs) - len(todo),
        "seconds_total": time.perf_counter() - begin,
        "seconds_predict": predict_seconds,
        "frames_per_second": frames / predict_seconds if predict_seconds > 0 and frames else None,
    }
    extra = {
        "ckpt": source.describe(),
        "output": str(out),
        "placement": place.describe(),
        "dtype": fingerprint["dtype"],
        "answer_mode": opts.answer_mode,
        "key_frames": opts.key_frames,
        "key_frame_mode": opts.key_frame_mode,
        "frames_on": opts.frames_on,
    }
    summary = store.finish(runs, timing, extra)
    done_line = f"{summary['ok']}/{summary['runs']} runs ({summary['frames']} frames)"
    line = outcome_lines(summary, out, done_line, summary.get("frames_per_second"), "frames")
    line += f"\nper run and frame: {out / 'results.jsonl'}\nsummary:   {out / 'summary.json'}"
    print(line, flush=True)
    return summary
