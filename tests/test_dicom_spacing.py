"""Millimetre distances of single-frame DICOM inputs use the file's own pixel spacing, unless `pixel_spacing=` is
given (the user's value wins); the spacing fields a DICOM file may state, read from its header."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_video import _dicom  # a minimal XA DICOM, single- or multi-frame
from vseg.cli import compose
from vseg.data.dicom import dicom_pixel_spacing
from vseg.data.synthetic import generate_vessels
from vseg.distances import surface_distances
from vseg.predict import run as predict


def _angiogram(seed: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(12-bit grey image, vessel mask) of a synthetic angiogram."""
    image, mask = generate_vessels(seed=seed, size=size, style="angiogram")
    return image[..., 0].astype(np.uint16) * 16, mask.astype(bool)


def test_spacing_fields_of_a_dicom_header(tmp_path):
    grey = np.zeros((8, 10), np.uint16)
    both = _dicom(tmp_path / "a.dcm", grey, PixelSpacing=[0.3, 0.4], ImagerPixelSpacing=[0.2, 0.2])
    assert dicom_pixel_spacing(both) == ((0.3, 0.4), "PixelSpacing")  # in the patient: preferred
    detector = _dicom(tmp_path / "b.dcm", grey, ImagerPixelSpacing=[0.3, 0.24])
    assert dicom_pixel_spacing(detector) == ((0.3, 0.24), "ImagerPixelSpacing")
    magnified = _dicom(
        tmp_path / "c.dcm", grey, ImagerPixelSpacing=[0.3, 0.24], EstimatedRadiographicMagnificationFactor=1.5
    )
    spacing, fields = dicom_pixel_spacing(magnified)
    assert (
        spacing == pytest.approx((0.2, 0.16))
        and fields == "ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    )
    assert dicom_pixel_spacing(_dicom(tmp_path / "d.dcm", grey)) is None
    assert dicom_pixel_spacing(_dicom(tmp_path / "e.dcm", grey, PixelSpacing=[0, 0.4])) is None  # not a size
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"junk" * 50)
    assert dicom_pixel_spacing(junk) is None  # its read fails later, with the file's name


def _records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _expected(out: Path, record: dict, truth: np.ndarray, spacing: tuple[float, float] | None) -> dict:
    pred = np.asarray(Image.open(out / record["mask"])) > 0
    return surface_distances(pred, truth, spacing)


def test_dicom_inputs_measure_in_their_own_millimetres_unless_pixel_spacing_is_given(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    truths = {}
    grey, truths["scan"] = _angiogram(1)
    _dicom(root / "scan.dcm", grey, PixelSpacing=[0.5, 0.25])
    grey, truths["detector"] = _angiogram(2)
    _dicom(root / "detector.dcm", grey, ImagerPixelSpacing=[0.3, 0.3], EstimatedRadiographicMagnificationFactor=1.5)
    image, truths["photo"] = generate_vessels(seed=3, size=64, style="angiogram")
    Image.fromarray(image).save(root / "photo.png")  # a PNG carries no pixel size
    for name, truth in truths.items():
        Image.fromarray(truth.astype(np.uint8) * 255).save(root / f"{name}_mask.png")
    listing = root / "list.txt"
    listing.write_text("scan.dcm\tscan_mask.png\ndetector.dcm\tdetector_mask.png\nphoto.png\tphoto_mask.png\n")
    base = ["ckpt=random", "model=tiny", f"input={listing}", "num_workers=0"]

    out = tmp_path / "own"
    summary = predict(compose("predict", [*base, f"output={out}"]))
    records = _records(out)
    scan, detector, photo = records["scan"], records["detector"], records["photo"]
    assert scan["pixel_spacing_mm"] == [0.5, 0.25] and scan["pixel_spacing_from"] == "DICOM PixelSpacing"
    assert detector["pixel_spacing_mm"] == pytest.approx([0.2, 0.2])
    assert detector["pixel_spacing_from"] == "DICOM ImagerPixelSpacing / EstimatedRadiographicMagnificationFactor"
    assert "pixel_spacing_mm" not in photo and "hd95_mm" not in photo and "hd95" in photo
    for record, spacing in ((scan, (0.5, 0.25)), (detector, (0.2, 0.2))):
        expected = _expected(out, record, truths[record["id"]], spacing)
        assert {k: record[k] for k in expected} == pytest.approx(expected)
        assert set(expected) == {"hd95", "assd", "hd95_mm", "assd_mm"}
        assert record["hd95_mm"] is not None and record["hd95_mm"] < record["hd95"]  # (the seeded model finds some)
    assert summary["with_pixel_spacing"] == 2 and summary["with_ground_truth"] == 3  # mm means over the two DICOMs

    out = tmp_path / "given"
    predict(compose("predict", [*base, f"output={out}", "pixel_spacing=[0.1,0.1]"]))
    records = _records(out)
    for record in records.values():  # the user's pixel size, for every input, the DICOM files' own ignored
        assert record["pixel_spacing_mm"] == [0.1, 0.1] and record["pixel_spacing_from"] == "pixel_spacing="
        expected = _expected(out, record, truths[record["id"]], (0.1, 0.1))
        assert {k: record[k] for k in expected} == pytest.approx(expected)
