"""Checkpoint files of a run directory: which are complete, which is newest, rotation, atomic commit.

A checkpoint is written under a temporary name and committed with `os.replace` (files) or a completion
marker plus a rename (DeepSpeed directories), after fsync (`vseg.training.faults.checkpointing.save_checkpoint_atomic`
drives the writing). Everything here is about the files: a write killed half way never replaces the last
good checkpoint and is never taken for the newest one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vseg.artifacts.loading import load_torch_file

log = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
COMPLETE_MARKER = "vseg_complete.json"
STEP_NAME = re.compile(r"^step(\d+)\.ckpt$")


# ---------------------------------------------------------------------------------------------- files
def fsync(path: Path) -> None:
    """Flushes a file's (or a directory entry's) data to disk; directories are best effort."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def is_complete(path: Path) -> bool:
    """Whether `path` is a fully written checkpoint (cheap: no tensors are read).

    Files: committed by rename, checked to end with a zip directory (torch.save writes it last).
    DeepSpeed directories: hold the completion marker written after every rank finished.
    """
    if path.name.endswith(TMP_SUFFIX):
        return False
    if path.is_dir():
        return (path / COMPLETE_MARKER).is_file()
    return path.is_file() and zipfile.is_zipfile(path)


def checkpoint_step(path: Path) -> int | None:
    """The global step stored in a complete checkpoint; None when it is incomplete or unreadable."""
    if not is_complete(path):
        return None
    try:
        if path.is_dir():
            return int(json.loads((path / COMPLETE_MARKER).read_text())["global_step"])
        # mmap: only the small pickled structure is read, tensors stay on disk.
        ckpt = load_torch_file(path)
        return int(ckpt["global_step"])
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint is simply not a candidate
        log.warning("ignoring unreadable checkpoint %s: %s", path, err)
        return None


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(global_step, path) of every complete checkpoint in `directory`, oldest first.

    Step checkpoints are named `step<N>.ckpt`; `last.ckpt` (and a `last.ckpt.old` left by a directory
    swap that was cut short) are read for their step. Ties go to the most recently written one.
    """
    if not directory.is_dir():
        return []
    found: list[tuple[int, float, Path]] = []
    for path in directory.iterdir():
        if path.name.endswith(TMP_SUFFIX) or not path.name.endswith((".ckpt", ".ckpt" + OLD_SUFFIX)):
            continue
        match = STEP_NAME.match(path.name)
        named = int(match.group(1)) if match and is_complete(path) else None
        step = named if match else checkpoint_step(path)
        if step is not None:
            found.append((step, path.stat().st_mtime, path))
    found.sort(key=lambda t: (t[0], t[1]))
    return [(step, path) for step, _, path in found]


def newest_checkpoint(directory: Path) -> Path | None:
    """The complete checkpoint with the highest global step in `directory`, or None."""
    found = complete_checkpoints(directory)
    return found[-1][1] if found else None


def rotate_checkpoints(directory: Path, keep: int, protect: Path | None = None) -> list[Path]:
    """Deletes complete `step<N>.ckpt` checkpoints beyond the newest `keep`; returns what it deleted.

    Only complete checkpoints count towards `keep`, so the newest good one always stays; incomplete
    step files are left alone (they are never picked), and `protect` is never deleted.
    """
    steps = [(s, p) for s, p in complete_checkpoints(directory) if STEP_NAME.match(p.name)]
    doomed = [p for _, p in steps[: max(len(steps) - max(keep, 1), 0)] if p != protect]
    for path in doomed:
        remove(path)
    return doomed


def write_marker(directory: Path, payload: dict[str, Any]) -> None:
    tmp = directory / (COMPLETE_MARKER + TMP_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / COMPLETE_MARKER)


def commit(tmp: Path, path: Path, step: int) -> None:
    """Rank 0: makes a finished temporary checkpoint the real one (atomic for files)."""
    if tmp.is_dir():
        for sub in sorted(tmp.rglob("*")):
            if sub.is_file():
                fsync(sub)
        write_marker(tmp, {"global_step": step, "time": time.time()})
        fsync(tmp)
        old = path.with_name(path.name + OLD_SUFFIX)
        if path.exists():
            remove(old)
            os.replace(path, old)  # a directory cannot replace a non-empty one in one rename
        os.replace(tmp, path)
        remove(old)
    else:
        fsync(tmp)
        os.replace(tmp, path)
    fsync(path.parent)


class PlainCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file straight to the path it is given, with a plain `open()`.

    `save_checkpoint_atomic` already writes under a temporary name next to the checkpoint and renames it.
    Lightning's own atomic save would first stage a full copy in the system temp directory (fsspec's
    `tempfile.mkstemp`) and move it: twice the I/O, a disk-full error naming the wrong file system, and a
    0600 file until fsspec fixes the mode.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())


def bytes_of(path: Path | None) -> int | None:
    """Size of a checkpoint file or directory (what the next checkpoint will need, roughly)."""
    if path is None:
        return None
    try:
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    except OSError:
        return None
