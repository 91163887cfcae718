"""Runs (cine loops, videos): what a run input is, and its frames as (T, H, W, 3) uint8 RGB with timing.

Forms: a video file (`.mp4 .avi .mov .mkv .webm .m4v .mpg .mpeg .wmv`, decoded with PyAV), a multi-frame
DICOM (XA / XRF cine; `vseg.data.dicom`: windowing, MONOCHROME1, frame time and pixel spacing), an animated
GIF or a multi-page TIFF stack (Pillow), or a folder of frame images (natural order: `f2.png` before
`f10.png`). Every frame of a run has one size; a run that changes size is refused (the file and the frame
are named). A file that cannot be read raises `DataFileError` naming it, so a batch of runs goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from vseg.data.dicom import dicom_frame_count, read_dicom
from vseg.data.io import DICOM_SUFFIXES, IMAGE_SUFFIXES, DataFileError, read_image, read_mask

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
STACK_SUFFIXES = (".gif", ".tif", ".tiff")


@dataclass
class Run:
    """One run's frames and what results should say about it."""

    id: str  # output name (masks/<id>/...)
    source: str  # the file or folder it came from
    frames: np.ndarray  # (T, H, W, 3) uint8
    names: list[str]  # per-frame names (frame file stems, or 00000, 00001, ...)
    fps: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # DICOM: frame time, pixel spacing, window, modality

    def __len__(self) -> int:
        return int(self.frames.shape[0])


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers by value (frame2 < frame10)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def frame_names(count: int) -> list[str]:
    return [f"{i:05d}" for i in range(count)]


def _stack(frames: list[np.ndarray], source: Path | str) -> np.ndarray:
    if not frames:
        raise DataFileError(f"run {source}: holds no frames")
    shape = frames[0].shape
    for i, frame in enumerate(frames):
        if frame.shape != shape:
            raise DataFileError(
                f"run {source}: frame {i} is {frame.shape[1]}x{frame.shape[0]} but frame 0 is {shape[1]}x{shape[0]}; "
                "every frame of a run must have one size"
            )
    return np.ascontiguousarray(np.stack(frames))


def read_video(path: Path) -> tuple[np.ndarray, float | None]:
    """Frames of a video file (PyAV) and its frame rate."""
    import av  # optional (videos only): imported where a video is read

    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise DataFileError(f"video {path}: has no video stream")
            rate = float(stream.average_rate) if stream.average_rate else None
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except DataFileError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise DataFileError(f"video {path}: cannot be decoded ({type(err).__name__}: {err})") from None
    return _stack(frames, path), rate


def stack_frames(path: Path) -> int:
    """Frames in a GIF / TIFF (1 for still images); 0 when Pillow cannot open it."""
    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except Exception:  # noqa: BLE001 - unreadable: reported when it is read
        return 0


def read_stack(path: Path) -> tuple[np.ndarray, float | None]:
    """Frames of an animated GIF or multi-page TIFF, and the GIF's frame rate (from its frame duration)."""
    try:
        with Image.open(path) as image:
            duration = image.info.get("duration")
            frames = []
            for page in ImageSequence.Iterator(image):
                if page.mode in ("I;16", "I;16B", "I;16L", "I"):
                    array = np.asarray(page, dtype=np.float64)
                    peak = array.max() if array.size and array.max() > 255 else 255.0
                    grey = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
                    frames.append(np.repeat(grey[..., None], 3, axis=2))
                else:
                    frames.append(np.asarray(page.convert("RGB"), dtype=np.uint8).copy())
    except (OSError, ValueError, SyntaxError) as err:
        raise DataFileError(f"stack {path}: cannot be read ({type(err).__name__}: {err})") from None
    fps = 1000.0 / float(duration) if duration else None
    return _stack(frames, path), fps


def frame_files(folder: Path) -> list[Path]:
    """The images directly in `folder`, in natural order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def read_frame_folder(folder: Path) -> tuple[np.ndarray, list[str]]:
    files = frame_files(folder)
    if not files:
        raise DataFileError(f"run {folder}: the folder holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
    return _stack([read_image(p) for p in files], folder), [p.stem for p in files]


def is_run_file(path: Path) -> bool:
    """A file that holds a run: a video, a multi-frame DICOM, an animated GIF or a multi-page TIFF."""
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return True
    if suffix in DICOM_SUFFIXES:
        return dicom_frame_count(path) > 1
    if suffix in STACK_SUFFIXES:
        return stack_frames(path) > 1
    return False


def read_run(path: str | Path, run_id: str | None = None) -> Run:
    """The run at `path` (a run file or a folder of frames); `DataFileError` names the file on failure."""
    path = Path(path)
    run_id = run_id or path.stem
    if path.is_dir():
        frames, names = read_frame_folder(path)
        return Run(run_id, str(path), frames, names)
    if not path.is_file():
        raise DataFileError(f"run {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        frames, fps = read_video(path)
        return Run(run_id, str(path), frames, frame_names(len(frames)), fps)
    if suffix in DICOM_SUFFIXES:
        frames, meta = read_dicom(path)
        return Run(run_id, str(path), frames, frame_names(len(frames)), meta.fps, meta.as_dict())
    if suffix in STACK_SUFFIXES:
        frames, fps = read_stack(path)
        return Run(run_id, str(path), frames, frame_names(len(frames)), fps)
    raise DataFileError(
        f"run {path}: {suffix or 'no suffix'} is not a run format (video {', '.join(VIDEO_SUFFIXES)}; DICOM; "
        "GIF / TIFF stack; or a folder of frames)"
    )


def read_truth(folder: Path, run: Run) -> dict[int, np.ndarray]:
    """Ground-truth masks of some frames: `<folder>/<frame name>.<image suffix>` (or numbered by frame index).

    Frames without a file are simply not scored; a mask of the wrong size raises naming it.
    """
    by_stem = {p.stem: p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    truth: dict[int, np.ndarray] = {}
    height, width = run.frames.shape[1:3]
    for i, name in enumerate(run.names):
        path = by_stem.get(name) or by_stem.get(str(i)) or by_stem.get(f"{i:05d}")
        if path is None:
            continue
        mask = read_mask(path)
        if mask.shape != (height, width):
            raise DataFileError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but run {run.id} is {width}x{height}")
        truth[i] = mask
    return truth
