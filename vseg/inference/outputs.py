"""The output folder: masks, overlays, results.jsonl, summary.json — atomic, resumable, shared by ranks.

Layout of `output=DIR`:

    run.json               what produced the folder (checkpoint, prompt/answer settings, threshold, dtype)
    masks/<id>.png         0/255 mask at the input's own size
    masks/<target>/<id>.png   with targets=: one mask per target
    overlays/<id>.png      the input with the prediction in red (and, with ground truth, missed vessels in blue);
                           with targets=, each target in its colour above a legend
    progress/rank<r>.jsonl journal: one line per finished input, appended after its files are in place
    results.jsonl          one record per input, in input order (written at the end)
    summary.json           means, counts and speed (written at the end)

Every file is written under a temporary name and renamed into place, so a killed run never leaves a
half-written PNG under a final name. An input counts as done when its journal line parses, says `ok`, and
its mask and overlay exist: a re-run skips those (`overwrite=true` starts over), redoes failed and unfinished
ones, and a torn last journal line (a kill during the append) is ignored. A folder written with other
settings (`run.json` differs) is refused unless `overwrite=true`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vseg.artifacts.files import atomic_write, storage_error
from vseg.config import ConfigError
from vseg.distances import summarise_distances
from vseg.inference.engine import ItemPrediction
from vseg.inference.inputs import PredictItem
from vseg.inference.scoring import SCORES, score_masks
from vseg.inference.targets import overlay_targets

log = logging.getLogger(__name__)

OWNED = ("run.json", "masks", "overlays", "progress", "results.jsonl", "summary.json")


def atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text), "prediction file")


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """The image with the prediction blended in red and (with truth) missed foreground in blue."""
    out = image.astype(np.float32)
    red = np.array([255.0, 0.0, 0.0], np.float32)
    blue = np.array([0.0, 96.0, 255.0], np.float32)
    out[pred] = 0.45 * out[pred] + 0.55 * red
    if truth is not None:
        missed = truth & ~pred
        out[missed] = 0.45 * out[missed] + 0.55 * blue
    return out.clip(0, 255).astype(np.uint8)


def _png(array: np.ndarray) -> Any:
    image = Image.fromarray(array)
    return lambda p: image.save(p, format="PNG", compress_level=1)


def _scores(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over the entries with ground truth (distances: over those where defined, the rest counted)."""
    scored = [r for r in entries if "dice" in r]
    out: dict[str, Any] = {
        "with_ground_truth": len(scored),
        "foreground": float(np.mean([r["foreground"] for r in entries])) if entries else None,
    }
    for key in SCORES:
        out[key] = float(np.mean([r[key] for r in scored])) if scored else None
    out.update(summarise_distances(scored))
    if "hd95_mm" in out:  # mm means run over the entries whose pixel size is known, which may be fewer
        out["with_pixel_spacing"] = sum("hd95_mm" in r for r in scored)
    return out


def _spacing_fields(item: PredictItem) -> dict[str, Any]:
    """The pixel size a record's millimetre scores used, and where it came from (absent when unknown)."""
    if item.spacing is None:
        return {}
    return {"pixel_spacing_mm": [float(v) for v in item.spacing], "pixel_spacing_from": item.spacing_from}


class OutputStore:
    """One output folder. `prepare` (once, before any rank writes) then `open` on every rank.

    Args:
        root: the output folder.
        rank: this process's rank (its journal file).
        overlays: also write overlay PNGs.
        workers: threads that encode and write PNGs while the model works on the next batch.
        targets: with targets=, name -> prompt (recorded with each target's results).
    """

    def __init__(
        self,
        root: Path,
        rank: int = 0,
        overlays: bool = True,
        workers: int = 4,
        targets: dict[str, str] | None = None,
    ):
        self.root, self.rank, self.overlays, self.targets = root, rank, overlays, targets or {}
        self.journal_path = root / "progress" / f"rank{rank}.jsonl"
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(workers, 1), thread_name_prefix="vseg-write")
        self._pending: list[Future] = []
        self._journal = None
        self.written = 0
        self.failed = 0

    # ------------------------------------------------------------ preparing the folder
    @staticmethod
    def prepare(root: Path, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Checks (or clears, with `overwrite`) what is in `root`, then records `fingerprint` in run.json."""
        if root.exists() and not root.is_dir():
            raise ConfigError(f"output={root} exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        run_file = root / "run.json"
        if overwrite:
            for name in OWNED:
                target = root / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        elif run_file.is_file():
            try:
                previous = json.loads(run_file.read_text())
            except json.JSONDecodeError:
                previous = None
            if previous != fingerprint:
                changed = sorted(
                    k for k in set(fingerprint) | set(previous or {}) if (previous or {}).get(k) != fingerprint.get(k)
                )
                raise ConfigError(
                    f"output={root} holds predictions made with other settings ({', '.join(changed)} differ; see "
                    f"{run_file}): pass overwrite=true to replace them, or choose another output="
                )
        elif any(p.name not in OWNED for p in root.iterdir()):
            raise ConfigError(
                f"output={root} is a non-empty folder that vseg did not write; choose an empty or new folder"
            )
        atomic_text(run_file, json.dumps(fingerprint, indent=2) + "\n")

    def done(self) -> dict[str, dict[str, Any]]:
        """Records of finished inputs (by id), read from every rank's journal; unfinished ones are left out."""
        records: dict[str, dict[str, Any]] = {}
        for journal in sorted((self.root / "progress").glob("rank*.jsonl")):
            for line in journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill during the append
                if isinstance(record, dict) and "id" in record:
                    records[record["id"]] = record
        return {k: r for k, r in records.items() if r.get("status") == "ok" and self._files_exist(r)}

    def _files_exist(self, record: dict[str, Any]) -> bool:
        masks = [t.get("mask") for t in record["targets"].values()] if "targets" in record else [record.get("mask")]
        paths = masks + ([record.get("overlay")] if self.overlays else [])
        return all(p and (self.root / p).is_file() for p in paths)

    # ------------------------------------------------------------ writing
    def open(self) -> OutputStore:
        self.journal_path.parent.mkdir(parents=True, exist_ok=True)
        self._journal = self.journal_path.open("a")
        return self

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            assert self._journal is not None, "open() first"
            try:
                self._journal.write(json.dumps(record) + "\n")
                self._journal.flush()
            except OSError as err:  # a full disk: the same one-line StorageError as the PNGs' writes
                raise (storage_error(err, self.journal_path, "prediction journal") or err) from None

    def fail(self, item: PredictItem, error: str) -> None:
        log.warning("input %s failed: %s", item.source, error)
        self.failed += 1
        self._append(
            {
                "index": item.index,
                "id": item.id,
                "path": item.source,
                "prompt": item.prompt,
                "status": "failed",
                "error": error,
            }
        )

    def submit(
        self,
        item: PredictItem,
        prediction: ItemPrediction,
        image: np.ndarray,
        truth: np.ndarray | None,
        fov: np.ndarray | None,
        mode: str,
    ) -> None:
        """Writes one input's files and journal line on a worker thread.

        With targets, `prediction` and `truth` are dicts target name -> prediction / truth (or None).
        """
        write = self._write_targets if isinstance(prediction, dict) else self._write
        self._pending.append(self._pool.submit(write, item, prediction, image, truth, fov, mode))
        if len(self._pending) > 256:
            self._drain(keep=64)

    def _write(self, item, prediction, image, truth, fov, mode) -> None:
        mask_rel = f"masks/{item.id}.png"
        atomic_write(self.root / mask_rel, _png(prediction.mask.astype(np.uint8) * 255), "mask")
        record: dict[str, Any] = {
            "index": item.index,
            "id": item.id,
            "path": item.source,
            "prompt": item.prompt,
            "answer": prediction.answer,
            "answer_mode": mode,
            "seg_tokens": prediction.seg_tokens,
            "mask": mask_rel,
            "size": [int(prediction.mask.shape[0]), int(prediction.mask.shape[1])],
            "foreground": float(prediction.mask.mean()),
            "mean_logit": None if math.isnan(prediction.mean_logit) else prediction.mean_logit,
            "status": "ok",
        }
        if self.overlays:
            overlay_rel = f"overlays/{item.id}.png"
            atomic_write(self.root / overlay_rel, _png(overlay(image, prediction.mask, truth)), "overlay")
            record["overlay"] = overlay_rel
        if truth is not None:
            record.update(score_masks(prediction.mask, truth, fov, item.spacing))
            record["fov"] = fov is not None
        record.update(_spacing_fields(item))
        self._append(record)
        with self._lock:
            self.written += 1

    def _write_targets(self, item, predictions, image, truths, fov, mode) -> None:
        record: dict[str, Any] = {
            "index": item.index,
            "id": item.id,
            "path": item.source,
            "answer_mode": mode,
            "size": [int(image.shape[0]), int(image.shape[1])],
            "targets": {},
            "status": "ok",
        }
        for name, prediction in predictions.items():
            mask_rel = f"masks/{name}/{item.id}.png"
            atomic_write(self.root / mask_rel, _png(prediction.mask.astype(np.uint8) * 255), "mask")
            entry: dict[str, Any] = {
                "prompt": self.targets.get(name),
                "answer": prediction.answer,
                "seg_tokens": prediction.seg_tokens,
                "mask": mask_rel,
                "foreground": float(prediction.mask.mean()),
                "mean_logit": None if math.isnan(prediction.mean_logit) else prediction.mean_logit,
            }
            truth = truths.get(name)
            if truth is not None:
                entry.update(score_masks(prediction.mask, truth, fov, item.spacing))
            record["targets"][name] = entry
        if self.overlays:
            overlay_rel = f"overlays/{item.id}.png"
            masks = {name: p.mask for name, p in predictions.items()}
            atomic_write(self.root / overlay_rel, _png(overlay_targets(image, masks)), "overlay")
            record["overlay"] = overlay_rel
        record["fov"] = fov is not None
        record.update(_spacing_fields(item))
        self._append(record)
        with self._lock:
            self.written += 1

    def _drain(self, keep: int = 0) -> None:
        while len(self._pending) > keep:
            self._pending.pop(0).result()  # re-raises a writer error here

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
        if self._journal is not None:
            os.fsync(self._journal.fileno())
            self._journal.close()
            self._journal = None

    # ------------------------------------------------------------ merging
    def collect(self, items: list[PredictItem]) -> list[dict[str, Any]]:
        """The newest record of every input, in input order (inputs never reached are `missing`)."""
        latest: dict[str, dict[str, Any]] = {}
        for journal in sorted((self.root / "progress").glob("rank*.jsonl")):
            for line in journal.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    previous = latest.get(record["id"])
                    if previous is None or previous.get("status") != "ok" or record.get("status") == "ok":
                        latest[record["id"]] = record
        out = []
        for item in items:
            record = latest.get(item.id)
            if record is None or (record.get("status") == "ok" and not self._files_exist(record)):
                record = {"id": item.id, "path": item.source, "prompt": item.prompt, "status": "missing"}
            out.append({**record, "index": item.index})
        return out

    def finish(self, items: list[PredictItem], timing: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        """Writes results.jsonl (input order) and summary.json; returns the summary."""
        records = self.collect(items)
        atomic_text(self.root / "results.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        ok = [r for r in records if r["status"] == "ok"]
        summary: dict[str, Any] = {
            **extra,
            "images": len(records),
            "ok": len(ok),
            "failed": sum(r["status"] == "failed" for r in records),
            "missing": sum(r["status"] == "missing" for r in records),
        }
        names = list(extra.get("targets") or {})
        if names:  # one entry per (image, target): the overall means run over all of them, as validation's do
            per_target = {
                n: [{"id": r["id"], **r["targets"][n]} for r in ok if n in r.get("targets", {})] for n in names
            }
            prompts = extra["targets"] if isinstance(extra["targets"], dict) else {}
            summary["targets"] = {n: {"prompt": prompts.get(n), **_scores(e)} for n, e in per_target.items()}
            summary.update(_scores([e for entries in per_target.values() for e in entries]))
        else:
            summary.update(_scores(ok))
        summary.update(timing)
        summary["failures"] = [
            {"path": r["path"], "error": r.get("error", "not predicted")} for r in records if r["status"] != "ok"
        ][:50]
        atomic_text(self.root / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary


def scores_line(scores: dict[str, Any]) -> str:
    """The mean scores of a summary (or of one target in it) on one line."""
    keys = ("dice", "iou", "cldice", "hd95", "assd", "hd95_mm", "assd_mm")
    return "  ".join(f"{k} {scores[k]:.4f}" for k in keys if scores.get(k) is not None)


def outcome_lines(summary: dict[str, Any], out: Path, done: str, speed: float | None, unit: str) -> str:
    """What a prediction run printed at its end: what was done where, the scores (per target too), the speed,
    failures, and the two result files."""
    scores = scores_line(summary)
    for name, target in (summary.get("targets") or {}).items():
        if scores_line(target):
            scores += f"\n  {name}: {scores_line(target)}"
    line = f"\n{done} in {out}"
    line += f"  {scores}" if scores else ""
    line += f"  ({speed:.1f} {unit}/s)" if speed else ""
    if summary["failed"] or summary["missing"]:
        line += f"\n{summary['failed']} failed, {summary['missing']} missing: see {out / 'summary.json'}"
    return line
