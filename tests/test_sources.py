"""Dataset sources on small files written here: folders, polygons (mixed 800/512 rescaling), COCO, DRIVE, and
every kind of broken input giving its own clear message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vseg.config import AugmentConfig, DataConfig, SplitConfig
from vseg.data.augment import Augmenter
from vseg.data.check import check_dataset
from vseg.data.geometry import rasterize
from vseg.data.records import load_sample
from vseg.data.sources import DataSourceError, read_records

from conftest import ROOT

DRIVE = ROOT.parent / "shared" / "data" / "DRIVE"


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# ---------------------------------------------------------------- folders


def _write_folder(root: Path) -> dict[str, np.ndarray]:
    """Images in several formats with masks in several encodings; returns the true masks by id."""
    (root / "masks").mkdir(parents=True)
    truth = {}
    h, w = 40, 48
    encodings = {
        "a": ("png", lambda m: Image.fromarray(m.astype(np.uint8) * 255)),  # 0/255
        "b": ("tif", lambda m: Image.fromarray(m.astype(np.uint8))),  # 0/1
        "c": ("gif", lambda m: _palette(m)),  # palette
        "d": ("bmp", lambda m: Image.fromarray(np.repeat(m[..., None].astype(np.uint8) * 255, 3, 2))),  # RGB
    }
    for image_fmt, (k, (mask_fmt, encode)) in zip(["jpg", "ppm", "tif", "png"], encodings.items(), strict=True):
        mask = _disk(h, w, 20, 24, 8 + len(truth))
        truth[k] = mask
        Image.fromarray(_image(h, w, len(truth))).save(root / f"{k}_{mask_fmt}.{image_fmt}")
        encode(mask).save(root / "masks" / f"{k}.{mask_fmt}")
    return truth


def _palette(mask: np.ndarray) -> Image.Image:
    pil = Image.fromarray(mask.astype(np.uint8) * 3, mode="P")  # index 3 = vessel
    pil.putpalette([0, 0, 0, 9, 9, 9, 50, 50, 50, 255, 0, 0] + [0] * 756)
    return pil


def test_folders_read_every_format_and_mask_encoding(tmp_path):
    truth = _write_folder(tmp_path)
    cfg = DataConfig(
        source="folders",
        root=str(tmp_path),
        image_pattern=r"(?P<id>[a-d])_(?P<ext>\w+)\.(jpg|ppm|tif|png)",  # named groups fill the mask template
        mask_pattern="masks/{id}.{ext}",
        image_size=None,
    )
    records = {r.id: r for r in read_records(cfg)}
    assert set(records) == set(truth)
    for rid, mask in truth.items():
        sample = load_sample(records[rid], None)
        assert sample.image.shape == (40, 48, 3) and sample.image.dtype == np.uint8
        assert np.array_equal(sample.masks[0], mask), rid


def test_folder_masks_resize_without_blurring_labels(tmp_path):
    (tmp_path / "masks").mkdir()
    mask = _disk(100, 100, 50, 50, 30)
    Image.fromarray(_image(100, 100)).save(tmp_path / "x.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "masks" / "x.png")
    cfg = DataConfig(source="folders", root=str(tmp_path), image_size=64)
    sample = load_sample(read_records(cfg)[0], 64)
    assert sample.masks.dtype == bool and sample.masks.shape == (1, 64, 64)
    assert sample.resized and sample.original_size == (100, 100)
    expected = _disk(64, 64, 32 - 0.5 * (1 - 64 / 100), 32 - 0.5 * (1 - 64 / 100), 30 * 0.64)
    assert (sample.masks[0] != expected).sum() <= 24  # only a few of the ~120 boundary pixels may differ


# ---------------------------------------------------------------- polygons: the users' mixed 800/512 set


def _vessel_polygons(rng: np.random.Generator) -> list[list[float]]:
    """Two thin vessel-like outlines and a blob, integer coordinates on a 512x512 image."""
    polys = []
    for _ in range(2):
        x0, y0 = rng.integers(20, 200, 2)
        x1, y1 = rng.integers(300, 490, 2)
        polys.append([x0, y0, x1, y1, x1 + 3, y1 + 4, x0 + 3, y0 + 4])
    cx, cy = rng.integers(100, 400, 2)
    polys.append([cx - 20, cy, cx, cy - 25, cx + 22, cy, cx, cy + 18])
    return [[float(v) for v in p] for p in polys]


def test_mixed_800_and_512_polygons_land_exactly_at_512(tmp_path):
    rng = np.random.default_rng(0)
    entries, expected = [], {}
    for i in range(6):
        size = 800 if i % 2 == 0 else 512
        polys512 = _vessel_polygons(rng)
        polys = [[v * size / 512 for v in p] for p in polys512]  # the annotation in the image's own pixels
        name = f"frame{i}.png"
        Image.fromarray(_image(size, size, i)).save(tmp_path / name)
        fmt = [[[p[j], p[j + 1]] for j in range(0, len(p), 2)] for p in polys] if i % 3 == 0 else polys
        entries.append({"image": name, "mask": [fmt], "text": ["coronary artery"], "width": size, "height": size})
        expected[f"frame{i}"] = rasterize([np.array(p).reshape(-1, 2) for p in polys512], 512, 512)
    ann = tmp_path / "vessels.json"
    ann.write_text(json.dumps(entries))
    cfg = DataConfig(source="polygons", annotations=str(ann), image_size=512)
    report = check_dataset(cfg, progress=False)
    assert not report.bad, report.format()
    assert sum(c.resized for c in report.checks) == 3  # the 800x800 frames
    for record in read_records(cfg):
        sample = load_sample(record, 512)
        assert sample.image.shape == (512, 512, 3)
        assert expected[record.id].sum() > 1000
        assert np.array_equal(sample.masks[0], expected[record.id]), record.id  # pixel for pixel


def test_polygon_holes_union_versus_even_odd(tmp_path):
    Image.fromarray(_image(50, 50)).save(tmp_path / "r.png")
    outer, inner = [5, 5, 45, 5, 45, 45, 5, 45], [15, 15, 35, 15, 35, 35, 15, 35]
    (tmp_path / "a.json").write_text(json.dumps([{"image": "r.png", "mask": [[outer, inner]]}]))
    base = {"source": "polygons", "annotations": str(tmp_path / "a.json"), "image_size": None}
    union = load_sample(read_records(DataConfig(**base))[0], None, holes="union").masks[0]
    ring = load_sample(read_records(DataConfig(**base))[0], None, holes="even_odd").masks[0]
    assert union.sum() == 40 * 40 and ring.sum() == 40 * 40 - 20 * 20
    assert not ring[25, 25] and union[25, 25]


def test_pad_keeps_aspect_and_marks_padding_outside_the_field_of_view(tmp_path):
    Image.fromarray(_image(100, 200)).save(tmp_path / "w.png")
    (tmp_path / "a.json").write_text(json.dumps([{"image": "w.png", "mask": [[0, 0, 200, 0, 200, 100, 0, 100]]}]))
    cfg = DataConfig(source="polygons", annotations=str(tmp_path / "a.json"), image_size=64, aspect="pad")
    sample = load_sample(read_records(cfg)[0], 64, aspect="pad")
    assert sample.image.shape == (64, 64, 3)
    assert sample.masks[0, :32].all() and not sample.masks[0, 32:].any()  # the whole image, top half
    assert np.array_equal(sample.fov, sample.masks[0])
    assert (sample.image[32:] == 0).all()


# ---------------------------------------------------------------- COCO


def _coco(tmp_path: Path) -> Path:
    h, w = 60, 80
    for name in ("p.png", "q.png"):
        Image.fromarray(_image(h, w, hash(name) % 100)).save(tmp_path / name)
    artery = _disk(h, w, 30, 30, 10)
    compressed = mask_utils.encode(np.asfortranarray(artery.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode("ascii")
    vein = _disk(h, w, 30, 60, 6)
    flat = vein.T.reshape(-1)  # column-major run lengths, starting with background
    runs, current, count = [], False, 0
    for v in flat:
        if v == current:
            count += 1
        else:
            runs.append(count)
            current, count = v, 1
    runs.append(count)
    data = {
        "images": [
            {"id": 1, "file_name": "p.png", "height": h, "width": w},
            {"id": 2, "file_name": "q.png", "height": h, "width": w},
        ],
        "categories": [{"id": 1, "name": "artery"}, {"id": 2, "name": "vein"}, {"id": 3, "name": "catheter"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "segmentation": compressed},
            {"id": 11, "image_id": 1, "category_id": 2, "segmentation": {"size": [h, w], "counts": runs}},
            {"id": 12, "image_id": 2, "category_id": 1, "segmentation": [[10, 10, 40, 10, 40, 40, 10, 40]]},
            {"id": 13, "image_id": 2, "category_id": 3, "segmentation": [[50, 10, 70, 10, 70, 30]]},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, artery, vein


def test_coco_rle_polygons_categories_and_per_object(tmp_path):
    path, artery, vein = _coco(tmp_path)
    merged = DataConfig(source="coco", annotations=str(path), categories=["artery", "vein"], image_size=None)
    records = {r.id: r for r in read_records(merged)}
    p = load_sample(records["p"], None)
    assert np.array_equal(p.masks.any(0), artery | vein)
    assert [o.phrase for o in records["p"].objects] == ["artery", "vein"]
    q = load_sample(records["q"], None)
    assert q.masks.shape[0] == 1 and q.masks[0].sum() == 30 * 30  # the catheter is filtered out
    per_object = check_dataset(
        DataConfig(
            source="coco",
            annotations=str(path),
            objects="per_object",
            image_size=None,
            split=SplitConfig(val_fraction=0.5),
        ),
        progress=False,
    )
    assert not per_object.bad, per_object.format()
    with pytest.raises(DataSourceError, match=r"unknown category \['vessel'\].*artery"):
        read_records(DataConfig(source="coco", annotations=str(path), categories=["vessel"]))


# ---------------------------------------------------------------- broken inputs


def _broken_polygons(tmp_path: Path) -> DataConfig:
    for name in ("ok1.png", "ok2.png", "small.png"):
        Image.fromarray(_image(32 if name == "small.png" else 64, 64, sum(map(ord, name)))).save(tmp_path / name)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    square = [4, 4, 40, 4, 40, 40, 4, 40]
    entries = [
        {"image": "ok1.png", "mask": [square]},
        {"image": "ok2.png", "mask": [square]},
        {"image": "corrupt.png", "mask": [square]},
        {"image": "missing.png", "mask": [square]},
        {"image": "ok1.png", "mask": [[[3, 3]]]},  # one point (and a duplicate image)
        {"image": "ok2.png", "mask": [[0, 0, 90, 0, 90, 90]], "text": ["vessel"]},  # outside the 64x64 image
        {"image": "small.png", "mask": [square], "width": 64, "height": 64},  # annotation for another size
        {"image": "ok2.png", "mask": [[1, 1, 5, 5, 9, 9]]},  # collinear: zero area
    ]
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    return DataConfig(source="polygons", annotations=str(tmp_path / "bad.json"), image_size=64)


def test_broken_dataset_lists_every_problem_with_its_reason(tmp_path):
    report = check_dataset(_broken_polygons(tmp_path), progress=False)
    text = report.format()
    assert not report.ok and len(report.bad) == 6
    for needle in (
        "corrupt.png: cannot be read as an image",
        "missing.png: file not found",
        "polygon 0 has 1 point(s)",
        "outside the 64x64 image",
        "annotation is for a 64x64 image but",
        "zero area",
        "duplicate: the same image file as record",
        "data.skip_invalid=true",
    ):
        assert needle in text, (needle, text)


def test_skip_invalid_skips_and_counts(tmp_path):
    cfg = _broken_polygons(tmp_path)
    cfg.skip_invalid = True
    cfg.split = SplitConfig(val_fraction=0.5)
    report = check_dataset(cfg, progress=False)
    assert report.ok and len(report.usable) == 2 and len(report.bad) == 6
    assert "6 of 8 images have problems (skipped" in report.format()
    assert {r.id for r in report.train + report.val} == {r.id for r in report.usable}


@pytest.mark.parametrize(
    ("content", "message"),
    [("[{", "not valid JSON (line 1"), ('{"a": 1}', "expected a JSON list"), ("[]", "has no records")],
)
def test_bad_annotation_files(tmp_path, content, message):
    (tmp_path / "x.json").write_text(content)
    with pytest.raises(DataSourceError, match=message.replace("(", r"\(")):
        read_records(DataConfig(source="polygons", annotations=str(tmp_path / "x.json")))


def test_folder_missing_mask_and_size_mismatch(tmp_path):
    (tmp_path / "masks").mkdir()
    for name, size in (("a", 32), ("b", 32), ("c", 32)):
        Image.fromarray(_image(size, size)).save(tmp_path / f"{name}.png")
    Image.fromarray(_disk(32, 32, 16, 16, 5).astype(np.uint8) * 255).save(tmp_path / "masks" / "a.png")
    Image.fromarray(_disk(20, 20, 10, 10, 5).astype(np.uint8) * 255).save(tmp_path / "masks" / "b.png")
    report = check_dataset(DataConfig(source="folders", root=str(tmp_path), image_size=32), progress=False)
    problems = {c.record.id: " ".join(c.problems) for c in report.bad}
    assert set(problems) == {"b", "c"}
    assert "is 20x20 but the image is 32x32" in problems["b"]
    assert "mask file not found" in problems["c"] and "data.mask_pattern" in problems["c"]
    with pytest.raises(DataSourceError, match="no file matches data.image_pattern"):
        read_records(DataConfig(source="folders", root=str(tmp_path), image_pattern=r"(?P<id>\d+)\.jpg"))


# ---------------------------------------------------------------- augmentation


def test_augmentation_moves_masks_with_the_image():
    mask = _disk(48, 64, 20, 40, 9) | _disk(48, 64, 5, 5, 3)
    image = np.repeat((mask * 200 + 20).astype(np.uint8)[..., None], 3, 2)
    aug = Augmenter(AugmentConfig(enabled=True, hflip=0.5, vflip=0.5, rot90=0.5, scale=[0.7, 1.4]))
    shapes = set()
    for i in range(20):
        out_image, out_masks, fov = aug(image, mask[None], None, np.random.default_rng([0, i]))
        shapes.add(out_image.shape)
        from_image = out_image[..., 0] > 110
        inside = fov if fov is not None else np.ones_like(from_image)
        disagree = (from_image != out_masks[0]) & inside
        assert disagree.sum() <= 0.03 * out_masks[0].sum() + 4, i  # only resampled edges may differ
    assert (64, 48, 3) in shapes and (48, 64, 3) in shapes  # rotations happened
    same = [aug(image, mask[None], None, np.random.default_rng([1, 2]))[0] for _ in range(2)]
    assert np.array_equal(*same)


# ---------------------------------------------------------------- DRIVE


@pytest.mark.skipif(not DRIVE.is_dir(), reason="../shared/data/DRIVE is not present on this machine")
def test_drive_preset_reads_the_real_dataset():
    from vseg.config import load_config

    from conftest import compose_cfg

    cfg = load_config(compose_cfg(["data=drive", f"data.root={DRIVE}", "data.image_size=256"])).data
    report = check_dataset(cfg, progress=False)
    assert report.ok and not report.bad, report.format()
    assert len(report.train) == 20 and len(report.val) == 20
    assert all(c.has_fov and c.original_size == (584, 565) and c.resized for c in report.checks)
    fg = [c.foreground for c in report.checks]
    assert min(fg) > 0.07 and max(fg) < 0.2  # vessels are 7-17 % of the DRIVE field of view
    sample = load_sample(report.train[0], 256)
    assert (
        sample.image.shape == (256, 256, 3) and sample.masks.shape == (1, 256, 256) and sample.fov.shape == (256, 256)
    )


# ---------------------------------------------------------------- training uses the same checks


def test_training_refuses_bad_data_before_building_the_model(tmp_path, monkeypatch):
    from vseg.data.check import DatasetProblems
    from vseg.training import run as train

    from conftest import tiny_cfg

    _broken_polygons(tmp_path)
    overrides = [
        "data=polygons",
        f"data.annotations={tmp_path / 'bad.json'}",
        "data.image_size=64",
        f"run_dir={tmp_path / 'run'}",
    ]

    def no_build(*args, **kwargs):
        raise AssertionError("the model must not be built for bad data")

    monkeypatch.setattr(train, "model_for_run", no_build)
    with pytest.raises(DatasetProblems, match="corrupt.png: cannot be read") as err:
        train.run(tiny_cfg(overrides))
    assert "data.skip_invalid=true" in str(err.value)
    monkeypatch.undo()
    result = train.run(
        tiny_cfg([*overrides, "data.skip_invalid=true", "data.split.val_fraction=0.5", "data.batch_size=1"])
    )
    assert result.global_step == 2


def test_vseg_check_command_exit_codes_and_dump(tmp_path, capsys):
    from vseg.cli import main

    good = tmp_path / "good"
    (good / "masks").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(_image(40, 40, ord(name))).save(good / f"{name}.png")
        Image.fromarray(_disk(40, 40, 20, 20, 8).astype(np.uint8) * 255).save(good / "masks" / f"{name}.png")
    dump = tmp_path / "dump"
    code = main(
        [
            "check",
            "data=folders",
            f"data.root={good}",
            "data.image_size=32",
            "data.split.val_fraction=0.5",
            f"dump={dump}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "no problems found" in out and "rescaled to 32x32 (stretch): 2 images" in out
    assert sorted(p.name for p in dump.iterdir()) == [
        f"{n}_{k}.png" for n in "ab" for k in ("image", "mask", "overlay")
    ]
    assert Image.open(dump / "a_mask.png").size == (32, 32)

    bad = tmp_path / "bad"
    bad.mkdir()
    _broken_polygons(bad)
    code = main(["check", "data=polygons", f"data.annotations={bad / 'bad.json'}", "data.image_size=64"])
    out = capsys.readouterr().out
    assert code == 1 and "6 of 8 images have problems" in out and "missing.png: file not found" in out
    assert main(["check", "data=folders", f"data.root={tmp_path / 'nowhere'}"]) == 2
    assert "data.root=" in capsys.readouterr().err
