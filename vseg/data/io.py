"""Reading images and masks from disk, with errors that name the file and say what is wrong.

Images: any format Pillow reads (TIF, GIF, PNG, JPG, PPM, BMP, ...) and single-frame DICOM, returned as HxWx3 uint8 RGB; 16-bit
grey images are scaled to 8 bits. Masks: palette (index > 0 is foreground), 0/255, 0/1 and RGB masks are
all read as HxW bool; lossy (JPEG) masks are thresholded at half their range, so compression noise around
0 or 255 does not leak into the labels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vseg.data.dicom import DICOM_SUFFIXES, read_dicom_image
from vseg.data.errors import DataFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".bmp", ".ppm", ".pgm", *DICOM_SUFFIXES)

# Vessel datasets are large single images (HRF is 3504x2336); refuse only absurd sizes (decompression bombs).
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


def _open(path: Path, what: str) -> Image.Image:
    if not path.is_file():
        raise DataFileError(f"{what} {path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise DataFileError(f"{what} {path}: cannot be read as an image ({type(err).__name__}: {err})") from None
    return image


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) read from the header only."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        import pydicom  # optional (DICOM only): imported where a DICOM file is read

        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    with Image.open(path) as image:
        return image.height, image.width


def read_image(path: str | Path) -> np.ndarray:
    """The image at `path` as HxWx3 uint8 RGB."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:  # single-frame DICOM (vseg.data.dicom: windowing, MONOCHROME1)
        return read_dicom_image(path)
    return rgb_array(_open(path, "image"), f"image {path}")


def rgb_array(image: Image.Image, name: str = "image") -> np.ndarray:
    """A loaded PIL image as HxWx3 uint8 RGB (16-bit greys scaled to their peak), as `read_image` reads files."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 255 else 255.0
        grey = np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":
        raise DataFileError(f"{name}: floating-point images are not supported; save it as 8-bit PNG/TIF")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def mask_from_pil(image: Image.Image, path: Path | str = "<mask>") -> np.ndarray:
    """An HxW bool foreground mask from a mask image of any common encoding."""
    if image.mode == "P":
        return np.asarray(image) > 0  # palette index 0 is the background
    if image.mode == "1":
        return np.asarray(image).astype(bool)
    if image.mode in ("RGBA", "LA"):
        image = image.convert("RGB" if image.mode == "RGBA" else "L")
    array = np.asarray(image)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.dtype.kind == "f":
        raise DataFileError(f"mask {path}: floating-point masks are not supported")
    peak = int(array.max()) if array.size else 0
    if peak <= 1:
        return array > 0  # 0/1 masks
    return array > peak / 2  # 0/255 (or 0/65535) masks, robust to lossy compression


def read_mask(path: str | Path) -> np.ndarray:
    """The mask at `path` as HxW bool."""
    path = Path(path)
    return mask_from_pil(_open(path, "mask"), path)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
