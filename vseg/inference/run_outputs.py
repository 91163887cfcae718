"""Runs (video, cine DICOM, GIF / TIFF stacks, frame folders) in predict.py: discovery, the output folder,
resume, and the per-run work (`predict_one_run`; the one-device loop `predict_runs`). `vseg.inference.runs`
drives them, on one device or data-parallel (`vseg.inference.run_parallel`).

Layout of `output=DIR` (the same folder rules as images, `OutputStore.prepare`: run.json fingerprint, refusal
of foreign folders, `overwrite=true`):

    masks/<run id>/<frame>.png      0/255 mask per frame at the run's size
    overlays/<run id>.mp4 | .gif    the run with the prediction in red (missed truth in blue where given)
    progress/runs.jsonl             journal: one line per finished run, appended after its files are in place
                                    (data-parallel: runs.rank<r>.jsonl, one per rank)
    results.jsonl                   per run: a `run` record, then one `frame` record per frame
    summary.json                    counts, means over scored frames, speed

Files are written under temporary names and renamed; a run counts as done when its journal line says `ok` and
its mask folder holds every frame (and its overlay exists): a re-run skips it. A run that cannot be read or
predicted gets a `failed` record with the reason, and the next run goes on.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from vseg.artifacts.files import atomic_write
from vseg.config import ConfigError
from vseg.config.predict import OVERLAY_FORMATS, VIDEO_MODES  # noqa: F401  (their home is the config)
from vseg.data.io import DataFileError, is_image_file
from vseg.data.runs import Run, is_run_file, read_run, read_truth
from vseg.inference.inputs import DEFAULT_PROMPT, InputError, _unique_ids
from vseg.inference.outputs import atomic_text, overlay
from vseg.inference.scoring import SCORES, score_masks
from vseg.inference.video import predict_run
from vseg.model.tracking import tracking_unsupported

log = logging.getLogger(__name__)


def run_inputs(spec: str, video: str, exclude: Path | None = None) -> list[tuple[str, Path]] | None:
    """(run id, path) of every run `input=` names, or None when it names images (the image path takes it).

    `video=auto`: a run file, or a folder holding run files (and no still images); `video=true`: also a
    folder of frames as one run; `video=false`: never runs.
    """
    if video == "false":
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return [(path.stem, path)] if is_run_file(path) else None
    if not path.is_dir():
        return None
    if video == "true":
        return [(path.resolve().name, path)]
    root = path.resolve()
    files = [p for p in root.rglob("*") if p.is_file() and not (exclude is not None and exclude in p.resolve().parents)]
    runs = [p for p in sorted(files) if is_run_file(p)]
    if not runs:
        return None
    stills = [p for p in files if is_image_file(p) and p not in runs]
    if stills:
        raise InputError(
            f"input={spec}: holds both runs ({runs[0].name}, ...) and still images ({stills[0].name}, ...); "
            "predict them separately, or pass video=true to treat the folder as one run of frames"
        )
    return list(zip(_unique_ids(runs, root), runs, strict=True))


def _truth_for(truth: Path | None, run: Run, single: bool) -> dict[int, np.ndarray]:
    if truth is None:
        return {}
    folder = truth / run.id if (truth / run.id).is_dir() else truth if single else None
    return read_truth(folder, run) if folder is not None else {}


def write_overlay_video(path: Path, frames: np.ndarray, fps: float | None, fmt: str) -> None:
    """The overlaid frames as an mp4 (H.264 when PyAV has it, else MPEG-4 Part 2) or a looping GIF."""
    rate = fps or 10.0

    def write(tmp: Path) -> None:
        if fmt == "gif":
            images = [Image.fromarray(f) for f in frames]
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=1000 / rate, loop=0)
            return
        import av  # lazy: PyAV's codec libraries load only when an mp4 overlay is written

        height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sides
        with av.open(str(tmp), mode="w", format="mp4") as container:
            codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
            stream = container.add_stream(codec, rate=round(rate))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for f in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(f[:height, :width], format="rgb24")))
            container.mux(stream.encode())

    atomic_write(path, write, "overlay video")


class RunStore:
    """The output folder of a runs prediction (see the module docstring)."""

    def __init__(self, root: Path, overlays: bool = True, overlay_format: str = "mp4", rank: int | None = None):
        self.root, self.overlays, self.format = root, overlays, overlay_format
        name = "runs.jsonl" if rank is None else f"runs.rank{rank}.jsonl"  # one writer per file
        self.journal = root / "progress" / name

    def records(self) -> dict[str, dict[str, Any]]:
        """Per run id, its `ok` record if any journal has one, else its newest record (torn lines skipped).

        Every journal is read (one-device and per-rank ones): a resumed folder may mix them.
        """
        out: dict[str, dict[str, Any]] = {}
        for journal in sorted((self.root / "progress").glob("runs*.jsonl")):
            for line in journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(record, dict) or "id" not in record:
                    continue
                if out.get(record["id"], {}).get("status") != "ok" or record.get("status") == "ok":
                    out[record["id"]] = record
        return out

    def done(self) -> set[str]:
        finished = set()
        for run_id, r in self.records().items():
            if r.get("status") != "ok":
                continue
            masks = [self.root / f["mask"] for f in r.get("frames", [])]
            if (
                masks
                and all(m.is_file() for m in masks)
                and (not r.get("overlay") or (self.root / r["overlay"]).is_file())
            ):
                finished.add(run_id)
        return finished

    def _append(self, record: dict[str, Any]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def fail(self, index: int, run_id: str, path: Path, error: str) -> None:
        log.warning("run %s failed: %s", path, error)
        self._append({"index": index, "id": run_id, "path": str(path), "status": "failed", "error": error})

    def write(self, index: int, run: Run, prediction, truth: dict[int, np.ndarray], prompt: str) -> dict[str, Any]:
        """Writes a run's masks and overlay, then its journal line; returns the record."""
        frames = []
        for i, name in enumerate(run.names):
            rel = f"masks/{run.id}/{name}.png"
            image = Image.fromarray(prediction.masks[i].astype(np.uint8) * 255)
            atomic_write(self.root / rel, lambda p, image=image: image.save(p, format="PNG", compress_level=1), "mask")
            mean = prediction.mean_logits[i]
            frame = {
                "frame": i,
                "name": name,
                "mask": rel,
                "key_frame": i in prediction.key_frames,
                "foreground": float(prediction.masks[i].mean()),
                "mean_logit": None if math.isnan(mean) else mean,
            }
            if run.fps:
                frame["time_s"] = i / run.fps
            if i in truth:
                frame.update(score_masks(prediction.masks[i], truth[i], None))
            frames.append(frame)
        record: dict[str, Any] = {
            "index": index,
            "id": run.id,
            "path": run.source,
            "prompt": prompt,
            "answer": prediction.answer,
            "seg_tokens": prediction.seg_tokens,
            "frames_total": len(run),
            "size": [int(run.frames.shape[1]), int(run.frames.shape[2])],
            "fps": run.fps,
            "key_frames": prediction.key_frames,
            **({"dicom": run.meta} if run.meta else {}),
            "scored_frames": sum(1 for f in frames if "dice" in f),
            "seconds": {k: round(v, 3) for k, v in prediction.seconds.items()},
            "status": "ok",
        }
        for key in SCORES:
            values = [f[key] for f in frames if key in f]
            record[key] = float(np.mean(values)) if values else None
        if self.overlays:
            rel = f"overlays/{run.id}.{self.format}"
            painted = np.stack([overlay(run.frames[i], prediction.masks[i], truth.get(i)) for i in range(len(run))])
            write_overlay_video(self.root / rel, painted, run.fps, self.format)
            record["overlay"] = rel
        record["frames"] = frames
        self._append(record)
        return record

    def finish(self, runs: list[tuple[str, Path]], timing: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """results.jsonl (per run: its record, then its frames) and summary.json; returns the summary."""
        latest = self.records()
        lines, records = [], []
        for index, (run_id, path) in enumerate(runs):
            record = latest.get(run_id) or {"id": run_id, "path": str(path), "status": "missing"}
            record = {**record, "index": index}
            frames = record.pop("frames", [])
            records.append(record)
            lines.append(json.dumps({"kind": "run", **record}))
            lines += [json.dumps({"kind": "frame", "run": run_id, **f}) for f in frames]
        atomic_text(self.root / "results.jsonl", "".join(line + "\n" for line in lines))
        ok = [r for r in records if r["status"] == "ok"]
        summary: dict[str, Any] = {
            **extra,
            "runs": len(records),
            "ok": len(ok),
            "failed": sum(r["status"] == "failed" for r in records),
            "missing": sum(r["status"] == "missing" for r in records),
            "frames": sum(r.get("frames_total", 0) for r in ok),
            "scored_frames": sum(r.get("scored_frames", 0) for r in ok),
            **timing,
        }
        for key in SCORES:
            weighted = [(r[key], r["scored_frames"]) for r in ok if r.get(key) is not None]
            total = sum(n for _, n in weighted)
            summary[key] = sum(v * n for v, n in weighted) / total if total else None
        summary["failures"] = [
            {"path": r["path"], "error": r.get("error", "not predicted")} for r in records if r["status"] != "ok"
        ][:50]
        atomic_text(self.root / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def predict_one_run(
    predictor: Callable[[], Any], store: RunStore, entry: tuple[int, str, Path], opts, single: bool
) -> int:
    """Reads, predicts and writes one run (or records why not); returns its frame count (0 when it failed).

    Args:
        predictor: () -> the Predictor, called only once a run has been read (a folder of broken files loads
            no model).
        entry: (index in the input list, run id, path).
        opts: predict.py's options (prompt, key_frames, key_frame_mode, frames_on, truth).
        single: the input is one run (truth masks may then lie directly in `truth=`).
    """
    index, run_id, path = entry
    prompt = opts.prompt or DEFAULT_PROMPT
    try:
        run = read_run(path, run_id)
        truth = _truth_for(Path(opts.truth).expanduser() if opts.truth else None, run, single)
    except DataFileError as err:
        store.fail(index, run_id, path, str(err))
        return 0
    model = predictor()
    try:
        prediction = predict_run(model, run, prompt, opts.key_frames, opts.key_frame_mode, opts.frames_on)
    except (ValueError, RuntimeError) as err:  # a run too long for max_length, a device error on this run
        store.fail(index, run_id, path, f"{type(err).__name__}: {err}")
        return 0
    store.write(index, run, prediction, truth, prompt)
    log.info("run %s: %d frames", run_id, len(run))
    return len(run)


def predict_runs(predictor_factory, todo: list[tuple[int, str, Path]], store: RunStore, opts, single: bool) -> float:
    """Predicts `todo` ((index, run id, path) each) on one device; returns the seconds spent predicting.

    Args:
        predictor_factory: () -> Predictor, called only when some run is read.
    """
    cache: list[Any] = []

    def predictor() -> Any:
        if not cache:
            cache.append(predictor_factory())
            check_can_track(cache[0])
        return cache[0]

    seconds = 0.0
    for entry in tqdm(todo, desc="runs", unit="run", dynamic_ncols=True, disable=len(todo) < 2):
        started = time.perf_counter()
        if predict_one_run(predictor, store, entry, opts, single):
            seconds += time.perf_counter() - started
    return seconds


def check_can_track(predictor) -> None:
    """A configuration error when the predictor's model cannot track runs (no SAM-2 memory)."""
    reason = tracking_unsupported(predictor.model.grounding)
    if reason is not None:
        raise ConfigError(f"ckpt={predictor.source.describe()} cannot predict runs: {reason}")
