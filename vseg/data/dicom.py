"""DICOM files (pydicom): single-frame images and multi-frame angiography runs (XA / XRF cine), as 8-bit RGB.

Angiography stores 10- to 16-bit grey values; the model wants 8-bit RGB. The grey range shown is the one the
file asks for: its (first) WindowCenter / WindowWidth (DICOM PS3.3 C.11.2.1.2, the linear function), after the
Modality LUT (RescaleSlope / Intercept); without a window, the min-max of the whole run (one range for all
frames, so brightness does not flicker between frames). MONOCHROME1 (white = low values) is inverted so that
vessels look the same as in MONOCHROME2. RGB / YBR files are converted to RGB by pydicom.

Frame timing and pixel spacing are carried along (`DicomMeta`) so that results can state them: FrameTime (ms)
or FrameTimeVector or CineRate / RecommendedDisplayFrameRate. Pixel spacing (`spacing_of`): PixelSpacing (in the
patient, PS3.3 10.7.1.3); else ImagerPixelSpacing (XA / XRF store the detector's spacing there) divided by
EstimatedRadiographicMagnificationFactor when the file states it (the size at the isocentre), else as stored
(the detector plane: object sizes come out larger by the geometric magnification, typically 1.2-1.5 in
angiography). Millimetre distances of single-frame DICOM images use it (`vseg.inference.inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vseg.data.errors import DataFileError

DICOM_SUFFIXES = (".dcm", ".dicom")


@dataclass(frozen=True)
class DicomMeta:
    """What a run's results report about its source file."""

    modality: str | None
    frames: int
    frame_time_ms: float | None  # time between frames
    pixel_spacing_mm: tuple[float, float] | None  # (row, column) spacing
    photometric: str | None
    window: tuple[float, float] | None  # (center, width) used, None for min-max

    @property
    def fps(self) -> float | None:
        return 1000.0 / self.frame_time_ms if self.frame_time_ms else None

    def as_dict(self) -> dict[str, object]:
        return {
            "modality": self.modality,
            "frames": self.frames,
            "frame_time_ms": self.frame_time_ms,
            "pixel_spacing_mm": list(self.pixel_spacing_mm) if self.pixel_spacing_mm else None,
            "photometric": self.photometric,
            "window": list(self.window) if self.window else None,
        }


def is_dicom_file(path: Path) -> bool:
    """A `.dcm` / `.dicom` name, or (any name) the `DICM` magic at byte 128."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix:  # named files of other kinds are not sniffed: PNGs are not DICOM
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _first(value: object) -> float | None:
    """A DS / multi-valued DS as one float (the first value, as viewers do)."""
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, str | bytes) and hasattr(value, "__len__"):
            value = value[0]  # type: ignore[index]
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, IndexError):
        return None


def _frame_time(ds) -> float | None:
    time = _first(ds.get("FrameTime"))
    if time:
        return time
    vector = ds.get("FrameTimeVector")
    if vector is not None and len(vector) > 1:
        return float(np.mean([float(v) for v in list(vector)[1:]]))  # first entry is 0 by definition
    rate = _first(ds.get("CineRate")) or _first(ds.get("RecommendedDisplayFrameRate"))
    return 1000.0 / rate if rate else None


def _pair(value: object) -> tuple[float, float] | None:
    try:
        row, column = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return (row, column) if row > 0 and column > 0 else None


def spacing_of(ds) -> tuple[tuple[float, float], str] | None:
    """(row, column) mm per pixel of a dataset and the fields it came from (see the module doc); None if unknown."""
    spacing = _pair(ds.get("PixelSpacing"))
    if spacing is not None:
        return spacing, "PixelSpacing"
    spacing = _pair(ds.get("ImagerPixelSpacing"))
    if spacing is None:
        return None
    factor = _first(ds.get("EstimatedRadiographicMagnificationFactor"))
    if factor is not None and factor > 0:
        return (
            spacing[0] / factor,
            spacing[1] / factor,
        ), "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    return spacing, "ImagerPixelSpacing"


def dicom_pixel_spacing(path: str | Path) -> tuple[tuple[float, float], str] | None:
    """`spacing_of` a DICOM file, from its header only; None when it states none (or is not readable DICOM)."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable: the caller reports it when it reads the pixels
        return None
    return spacing_of(ds)


def to_uint8(grey: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Grey values (any shape) -> uint8 through the DICOM linear window, or min-max when `window` is None."""
    grey = grey.astype(np.float64)
    if window is not None:
        center, width = window
        width = max(width, 1.0)
        # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped
        out = ((grey - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5) * 255.0
    else:
        low, high = float(grey.min()), float(grey.max())
        out = (grey - low) * (255.0 / (high - low)) if high > low else np.zeros_like(grey)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def read_dicom(path: str | Path) -> tuple[np.ndarray, DicomMeta]:
    """All frames of a DICOM file as (T, H, W, 3) uint8 RGB, with its metadata.

    Raises:
        DataFileError: not DICOM, no pixel data, or pixel data pydicom cannot decode (the message says which
            decoder package would help, as pydicom does).
    """
    import pydicom  # optional (DICOM only): imported where a DICOM file is read
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"DICOM {path}: file not found")
    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise DataFileError(f"DICOM {path}: not a readable DICOM file ({type(err).__name__}: {err})") from None
    if "PixelData" not in ds:
        raise DataFileError(f"DICOM {path}: holds no pixel data (a {ds.get('Modality', '?')} object without images)")
    try:
        pixels = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - pydicom raises many kinds for missing / failing decoders
        raise DataFileError(
            f"DICOM {path}: its pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}) cannot be decoded: {err}. "
            "Compressed files need a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg, or gdcm)"
        ) from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1))
    window = None
    if samples == 1:
        if frames == 1 and pixels.ndim == 2:
            pixels = pixels[None]
        from pydicom.pixels import apply_modality_lut

        grey = apply_modality_lut(pixels, ds)
        center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
        window = (center, width) if center is not None and width else None
        out = to_uint8(grey, window)
        if photometric == "MONOCHROME1":
            out = 255 - out  # low values are white in MONOCHROME1: vessels must look as in MONOCHROME2
        rgb = np.repeat(out[..., None], 3, axis=-1)
    else:
        if frames == 1 and pixels.ndim == 3:
            pixels = pixels[None]
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, photometric, "RGB")
        rgb = pixels if pixels.dtype == np.uint8 else to_uint8(pixels, None)
    meta = DicomMeta(
        modality=str(ds.get("Modality")) if ds.get("Modality") else None,
        frames=int(rgb.shape[0]),
        frame_time_ms=_frame_time(ds),
        pixel_spacing_mm=(spacing_of(ds) or (None, None))[0],
        photometric=photometric,
        window=window,
    )
    return np.ascontiguousarray(rgb), meta


def dicom_frame_count(path: str | Path) -> int:
    """NumberOfFrames from the header only (1 when absent); 0 when the file is not readable DICOM."""
    import pydicom  # optional (DICOM only)

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable: the caller reports it when it reads the pixels
        return 0
    return int(ds.get("NumberOfFrames", 1) or 1)


def read_dicom_image(path: str | Path) -> np.ndarray:
    """A single-frame DICOM as HxWx3 uint8 (a multi-frame file is refused: it is a run, see `predict.py`)."""
    frames, meta = read_dicom(path)
    if meta.frames != 1:
        raise DataFileError(
            f"DICOM {path}: holds {meta.frames} frames (a run); predict it as a video (predict.py input=<file>), "
            "or export single frames for training"
        )
    return frames[0]
