"""predict.py for runs (video, cine DICOM, GIF / TIFF stacks, frame folders): discovery, outputs, resume.

Layout of `output=DIR` (the same folder rules as images, `OutputStore.prepare`: run.json fingerprint, refusal
of foreign folders, `overwrite=true`):

    masks/<run id>/<frame>.png      0/255 mask per frame at the run's size
    overlays/<run id>.mp4 | .gif    the run with the prediction in red (missed truth in blue where given)
    progress/runs.jsonl             journal: one line per finished run, appended after its files are in place
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

from vseg.artifacts.files import atomic_write
from vseg.config.predict import OVERLAY_FORMATS, VIDEO_MODES  # noqa: F401  (their home is the config)
from vseg.data.io import DataFileError
from vseg.data.runs import Run, is_run_file, read_run, read_truth
from vseg.inference.inputs import InputError, _unique_ids
from vseg.inference.outputs import atomic_text, outcome_lines, overlay
from vseg.inference.scoring import SCORES, score_masks

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
    from vseg.data.io import is_image_file

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
        import av

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

    def __init__(self, root: Path, overlays: bool = True, overlay_format: str = "mp4"):
        self.root, self.overlays, self.format = root, overlays, overlay_format
        self.journal = root / "progress" / "runs.jsonl"

    def records(self) -> dict[str, dict[str, Any]]:
        """The newest journal record per run id (torn lines from a kill are skipped)."""
        out: dict[str, dict[str, Any]] = {}
        if self.journal.is_file():
            for line in self.journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
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


def predict_runs(
    predictor_factory, runs: list[tuple[str, Path]], out: Path, opts, extra: dict[str, Any]
) -> dict[str, Any]:
    """Predicts every run not done yet in `out` (prepared by the caller); returns the summary.

    Args:
        predictor_factory: () -> Predictor, called only when some run is left to do.
        opts: predict.py's Options (prompt, key_frames, key_frame_mode, frames_on, truth, overlays, ...).
        extra: settings recorded in summary.json.
    """
    from vseg.inference.inputs import DEFAULT_PROMPT
    from vseg.inference.video import predict_run

    begin = time.perf_counter()
    store = RunStore(out, opts.overlays, opts.overlay_format)
    done = store.done()
    todo = [(i, run_id, path) for i, (run_id, path) in enumerate(runs) if run_id not in done]
    if done:
        log.info("resuming: %d of %d runs already done in %s", len(done), len(runs), out)
    prompt = opts.prompt or DEFAULT_PROMPT
    predictor, frames, predict_seconds = None, 0, 0.0
    truth_root = Path(opts.truth).expanduser() if opts.truth else None
    for index, run_id, path in todo:
        try:
            run = read_run(path, run_id)
            truth = _truth_for(truth_root, run, len(runs) == 1)
        except DataFileError as err:
            store.fail(index, run_id, path, str(err))
            continue
        if predictor is None:
            predictor = predictor_factory()
        started = time.perf_counter()
        try:
            prediction = predict_run(predictor, run, prompt, opts.key_frames, opts.key_frame_mode, opts.frames_on)
        except (ValueError, RuntimeError) as err:  # a model that cannot track, a run too long for max_length
            store.fail(index, run_id, path, f"{type(err).__name__}: {err}")
            continue
        predict_seconds += time.perf_counter() - started
        store.write(index, run, prediction, truth, prompt)
        frames += len(run)
        print(f"run {run_id}: {len(run)} frames", flush=True)
    timing = {
        "predicted_now": len(todo),
        "skipped_done": len(runs) - len(todo),
        "seconds_total": time.perf_counter() - begin,
        "seconds_predict": predict_seconds,
        "frames_per_second": frames / predict_seconds if predict_seconds > 0 else None,
    }
    return store.finish(runs, timing, extra)


def predict_run_inputs(opts, source, runs: list[tuple[str, Path]], load: Callable[[Any], Any]) -> dict[str, Any]:
    """predict.py's body for runs: output folder checks, fingerprint, then `predict_runs`; returns the summary.

    `load`: device -> the `Predictor` (predict.py's own loader, so runs and images load alike).
    """
    from vseg.artifacts.files import check_writable
    from vseg.config import ConfigError
    from vseg.inference.outputs import OutputStore
    from vseg.inference.placement import resolve_device
    from vseg.inference.predictor import DEFAULT_ANSWER, inference_dtype

    if opts.devices not in (1, "1"):
        raise ConfigError("runs are tracked frame after frame on one device: use devices=1 (or device_map=...)")
    out = opts.output_dir
    if out is None:
        if source.form != "run" or source.path is None:
            raise ConfigError("output= is required (only a run directory has a default: <run>/predictions)")
        out = source.path / "predictions"
    if out.is_dir() or not out.exists():
        check_writable(out, "prediction output (output=)")
    device = resolve_device(opts.device)
    answer_text = opts.answer_text or (source.train_cfg.data.answer if source.train_cfg else DEFAULT_ANSWER)
    fingerprint = {
        "ckpt": source.describe(),
        "answer": opts.answer_mode,
        "answer_text": answer_text,
        "prompt": opts.prompt,
        "threshold": opts.threshold,
        "dtype": inference_dtype(opts.dtype, source, device),
        "key_frames": opts.key_frames,
        "key_frame_mode": opts.key_frame_mode,
        "overlay_format": opts.overlay_format if opts.overlays else None,
    }
    OutputStore.prepare(out, fingerprint, opts.overwrite)
    extra = {
        "ckpt": source.describe(),
        "output": str(out),
        "placement": f"model-parallel device_map={opts.device_map}" if opts.device_map else str(device),
        "dtype": fingerprint["dtype"],
        "key_frames": opts.key_frames,
        "key_frame_mode": opts.key_frame_mode,
        "frames_on": opts.frames_on,
    }
    summary = predict_runs(lambda: load(device), runs, out, opts, extra)
    done = f"{summary['ok']}/{summary['runs']} runs ({summary['frames']} frames)"
    line = outcome_lines(summary, out, done, summary.get("frames_per_second"), "frames")
    line += f"\nper run and frame: {out / 'results.jsonl'}\nsummary:   {out / 'summary.json'}"
    print(line, flush=True)
    return summary
